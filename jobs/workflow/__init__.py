"""`infgen run WORKFLOW.yaml`: the workflow file (spec), the stages' records (records), MLflow (tracking),
running one stage here or as a Ray job (execution), and the loop over the stages (runner)."""

from jobs.workflow.runner import Workflow, run_workflow

__all__ = ["Workflow", "run_workflow"]
