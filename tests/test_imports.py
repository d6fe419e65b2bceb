"""`infgen` is a torch library: what it imports, and what works with only its core dependencies installed.

Both tests run a fresh interpreter, so modules imported by other tests cannot hide a stray import.
"""

import json
import subprocess
import sys
import textwrap

FORBIDDEN = ("ray", "mlflow", "deepspeed", "img2dataset")

# Everything the `pipeline` extra adds (pyproject.toml); `pip install infgen` has none of them.
PIPELINE_ONLY = (
    "ray", "mlflow", "deepspeed", "img2dataset", "cleanfid", "lpips", "diffusers", "pyarrow", "fsspec",
    "scipy", "yaml",
)  # fmt: skip
# (pandas and requests, which the pipeline also uses, stay visible: torch probes for them with find_spec,
# and a finder that refuses them there would fail where a real missing package would not.)


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_infgen_is_a_pure_torch_library():
    code = (
        "import sys, infgen, infgen.vae, infgen.substitutes.embedded_vae, infgen.losses, infgen.metrics\n"
        "import infgen.metrics.perceptual, infgen.metrics.distribution, infgen.metrics.inception\n"
        "import infgen.images, infgen.discriminator, infgen.substitutes.synthetic\n"
        f"print(sorted(m for m in {FORBIDDEN!r} if m in sys.modules))"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


# The view of an environment with only the core dependencies: a finder placed first on sys.meta_path refuses
# the pipeline-only packages (and their submodules) as if they were not installed.
BLOCK_PIPELINE_PACKAGES = textwrap.dedent(
    f"""
    import importlib.abc, sys

    class RefusePipelinePackages(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname.split(".")[0] in {PIPELINE_ONLY!r}:
                raise ModuleNotFoundError(f"No module named {{fullname!r}} (blocked)", name=fullname)
            return None

    sys.meta_path.insert(0, RefusePipelinePackages())
    """
)

CORE_ONLY_CHECKS = textwrap.dedent(
    """
    import json
    import tempfile

    import torch
    import infgen

    model = infgen.InfGen(infgen.preset("tiny"))
    with tempfile.TemporaryDirectory() as directory:
        infgen.save(model, directory, metadata={"step": 1})
        loaded = infgen.load(directory)
    images = infgen.decode(loaded, torch.randn(1, 4, 8, 8), (24, 40))
    assert tuple(images.shape) == (1, 3, 24, 40), images.shape
    assert bool(images.abs().le(1).all())

    import infgen.discriminator, infgen.images, infgen.losses, infgen.vae
    from infgen.metrics import psnr, ssim
    from infgen.metrics.distribution import patch_boxes

    # The features that need the extra say which package and how to install it, instead of a bare
    # ModuleNotFoundError from deep inside.
    refusals = {}
    try:
        import infgen.metrics.inception
    except ImportError as error:
        refusals["inception"] = str(error)
    try:
        infgen.losses.DecoderLoss()
    except ImportError as error:
        refusals["lpips"] = str(error)
    try:
        infgen.vae.FrozenVAE.load("stabilityai/sd-vae-ft-ema")
    except ImportError as error:
        refusals["diffusers"] = str(error)
    print(sorted(module for module in sys.modules if module.split(".")[0] in BLOCKED))
    print(json.dumps(refusals))
    """
)


def test_core_dependencies_suffice_for_the_decoder():
    code = BLOCK_PIPELINE_PACKAGES + f"BLOCKED = {PIPELINE_ONLY!r}\n" + CORE_ONLY_CHECKS
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    imported, printed_refusals = result.stdout.strip().splitlines()
    assert imported == "[]"  # none of them came in by another route
    refusals = json.loads(printed_refusals)
    hint = "pip install 'infgen[pipeline]'"
    assert "clean-fid" in refusals["inception"] and hint in refusals["inception"]
    assert "lpips" in refusals["lpips"] and hint in refusals["lpips"]
    assert "diffusers" in refusals["diffusers"] and hint in refusals["diffusers"]


CLI_WITHOUT_THE_EXTRA = textwrap.dedent(
    """
    import contextlib, io, sys, tempfile

    import numpy, torch
    import infgen
    from jobs.cli import main

    with tempfile.TemporaryDirectory() as directory:
        infgen.save(infgen.InfGen(infgen.preset("tiny")), f"{directory}/decoder")
        latent = numpy.random.default_rng(0).standard_normal((4, 8, 8)).astype("float32")
        numpy.save(f"{directory}/z.npy", latent)
        decoded = main(["decode", "--checkpoint", f"{directory}/decoder", "--latents", f"{directory}/z.npy",
                        "--size", "24x40", "--out", f"{directory}/out.png"])
        errors = io.StringIO()
        with contextlib.redirect_stderr(errors):
            ingested = main(["ingest", "--embedded", "5", "--output", f"{directory}/ingest"])
    print(decoded, ingested)
    print(errors.getvalue().strip())
    """
)


def test_the_command_decodes_without_the_extra_and_names_it_for_the_stages():
    code = BLOCK_PIPELINE_PACKAGES + CLI_WITHOUT_THE_EXTRA
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    codes, message = result.stdout.strip().splitlines()[-2:]
    assert codes == "0 2"  # decode works; a stage exits 2 with a message instead of a traceback
    assert message.startswith("infgen ingest: needs ") and "pip install 'infgen[pipeline]'" in message
