"""Request and reply models: pydantic validates the JSON header of a /segment request (and FastAPI lists the
replies in /openapi.json, for the token holder); the arrays themselves travel as raw bytes (napari_dmoe.client)."""
from __future__ import annotations

import math
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ArrayInfo(BaseModel):
    name: str
    dtype: str
    shape: list[int]


class SegmentHeader(BaseModel):
    """The JSON header of a /segment request."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="model id from /models")
    attribute: Union[str, dict[str, str], None] = Field(
        None, description="a value, {name: value}, or null / 'unknown' to average over the routers")
    spacing: Optional[list[float]] = Field(None, description="mm per spatial axis, (z, y, x) order; null: unknown")
    origin: Optional[list[float]] = Field(None, description="first voxel position per axis (echoed back)")
    direction: Optional[list[list[float]]] = Field(
        None, description="row a: array axis a in (S, P, L); null: axis-aligned LPS (napari-dmoe's view)")
    routing: bool = Field(False, description="also return the mean routing map and the dominant expert")
    rgb: Optional[bool] = Field(None, description="last axis is colour; null: guessed like dmoe segment")
    modality: Optional[str] = Field(None, description="what the image is (DICOM Modality, e.g. CT), when known")
    force: bool = Field(False, description="segment an image that does not fit the model's training data "
                        "(dmoe segment --force); the reply lists what differs as warnings")
    settings: Optional[dict[str, Any]] = Field(
        None, description="engine options: overlap, window_batch, blend, unknown, mode2d (dmoe segment's defaults)")
    arrays: list[ArrayInfo]

    @field_validator("spacing")
    @classmethod
    def _positive(cls, value: Optional[list[float]]) -> Optional[list[float]]:
        if value is not None and (len(value) not in (2, 3) or not all(math.isfinite(s) and s > 0 for s in value)):
            raise ValueError("spacing needs 2 or 3 positive finite numbers (mm per axis, z y x)")
        return value

    @field_validator("direction")
    @classmethod
    def _square(cls, value: Optional[list[list[float]]]) -> Optional[list[list[float]]]:
        if value is None:
            return value
        n = len(value)
        if n not in (2, 3) or any(len(row) != n for row in value):
            raise ValueError("direction must be a 2x2 or 3x3 matrix (one row per spatial axis)")
        if not all(math.isfinite(v) for row in value for v in row):
            raise ValueError("direction holds a non-finite number")
        import numpy as np

        if abs(np.linalg.det(np.asarray(value))) < 1e-3:
            raise ValueError("direction matrix is degenerate (two axes point the same way)")
        d = np.asarray(value)
        if np.abs(d @ d.T - np.eye(n)).max() > 1e-3:
            raise ValueError("direction rows must be unit vectors at right angles (orthonormal); a sheared or "
                             "scaled volume cannot be placed: resample it, or harden its transform first")
        return value

    @field_validator("origin")
    @classmethod
    def _finite(cls, value: Optional[list[float]]) -> Optional[list[float]]:
        if value is not None and (len(value) not in (2, 3) or not all(math.isfinite(v) for v in value)):
            raise ValueError("origin needs 2 or 3 finite numbers (mm per axis, z y x)")
        return value

    @model_validator(mode="after")
    def _one_image(self) -> "SegmentHeader":
        if [a.name for a in self.arrays] != ["image"]:
            raise ValueError("a /segment request carries exactly one array, named 'image'")
        image = self.arrays[0]
        if len(image.shape) < 2:
            raise ValueError(f"image has shape {image.shape}: a 1-D array is not an image; send (y, x), (z, y, x) "
                             "or either with a trailing colour axis")
        for name, value in (("spacing", self.spacing), ("origin", self.origin), ("direction", self.direction)):
            if value is not None and not len(image.shape) - 1 <= len(value) <= len(image.shape):
                raise ValueError(f"{name} has {len(value)} axes but the image has shape {image.shape}")
        given = [len(v) for v in (self.spacing, self.origin, self.direction) if v is not None]
        if len(set(given)) > 1:
            raise ValueError("spacing, origin and direction must have one entry per spatial axis each")
        return self


class ErrorReply(BaseModel):
    error: str = Field(description="one line saying what is wrong and what to do")
    status: int


class ModelsReply(BaseModel):
    models: list[dict[str, Any]]


class HealthReply(BaseModel):
    """Without a token (when the server has one) only ``status``: a liveness check that publishes nothing."""

    status: str
    version: Optional[str] = None
    device: Optional[str] = None
    device_reason: Optional[str] = None
    models: Optional[list[str]] = None
    queued: Optional[int] = None
