import subprocess
import sys

FORBIDDEN = ("ray", "mlflow", "deepspeed", "img2dataset")


def test_infgen_is_a_pure_torch_library():
    # A fresh interpreter, so modules imported by other tests cannot hide a stray import.
    code = (
        "import sys, infgen, infgen.vae, infgen.embedded_vae, infgen.losses, infgen.metrics\n"
        "import infgen.perceptual, infgen.images, infgen.discriminator\n"
        f"print(sorted(m for m in {FORBIDDEN!r} if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout
