"""Training pipelines: one YAML declares training in steps (data, freezing, optimizers, transitions);
`prep pipeline validate` shows the plan, and the orchestrator runs it with exact resume."""

from importlib.resources import files

from prep.pipeline.config import PipelineConfig, StepConfig, parse_pipeline_config
from prep.pipeline.durations import Duration, parse_duration
from prep.pipeline.resolve import Resolved, resolve_setting

__all__ = [
    "Duration",
    "PipelineConfig",
    "Resolved",
    "StepConfig",
    "StepContext",
    "TrainingPipelineOrchestrator",
    "example_yaml",
    "parse_duration",
    "parse_pipeline_config",
    "resolve_setting",
]


def __getattr__(name: str) -> object:
    """The orchestrator imports torch: loaded on first use, so `prep pipeline example` starts fast."""
    if name in ("TrainingPipelineOrchestrator", "StepContext"):
        from prep.pipeline import orchestrator

        return getattr(orchestrator, name)
    raise AttributeError(f"module 'prep.pipeline' has no attribute {name!r}")


def example_yaml() -> str:
    """The commented starter pipeline (also at configs/pipelines/example.yaml)."""
    return files("prep.pipeline").joinpath("example.yaml").read_text("utf-8")
