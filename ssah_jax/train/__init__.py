"""Training: pure state / loss / optimizer / sharded step (``step``), LoRA adapters (``lora``),
and the loop with metrics, evaluation hooks and orbax checkpoints (``loop``)."""

from ssah_jax.train.lora import LoraConfig
from ssah_jax.train.step import (
    SCHEDULES,
    Objective,
    OptimizerConfig,
    ResponseLoss,
    Trainee,
    TrainState,
    apply_gradients,
    compile_eval_step,
    compile_train_step,
    create_state,
    learning_rate_schedule,
    make_optimizer,
    model_shardings,
    objective_scale,
    objective_value,
    term_metrics,
    train_step,
)

__all__ = [
    "SCHEDULES",
    "LoraConfig",
    "Objective",
    "OptimizerConfig",
    "ResponseLoss",
    "TrainState",
    "Trainee",
    "apply_gradients",
    "compile_eval_step",
    "compile_train_step",
    "create_state",
    "learning_rate_schedule",
    "make_optimizer",
    "model_shardings",
    "objective_scale",
    "objective_value",
    "term_metrics",
    "train_step",
]
