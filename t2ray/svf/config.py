"""SVF knobs (defaults are the paper's; see SPEC §1)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class SVFConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target_modules: str | list[str] = Field("mlp", description="mlp | attn | all | list of module-name suffixes")
    layers: str | list[int] | None = Field(None, description="layer indices or ranges like '0-14,20'; None = all")
    max_mult: float = Field(1.0, gt=0, description="z = sigmoid(p) * max_mult")
    init_mean: float = Field(0.1, description="p initialised to init_mean + init_std * N(0,1)")
    init_std: float = Field(0.01, ge=0)
    svd_dtype: Literal["float32", "float64"] = Field("float32", description="float64 for a tighter decomposition")
    mode: Literal["materialized", "factored"] = Field(
        "materialized",
        description="materialized: build W' once per z (generation, big batches); factored: z per row/token",
    )
