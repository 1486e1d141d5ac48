"""The shape every analysis result shares: a tidy table, the tensors behind it, the options.

Subclass :class:`Result` as a frozen dataclass. Saving is generic: DataFrame
fields go to ``<field>.json`` (columns as exact JSON lists, dtypes kept),
tensors and dicts of tensors to one ``tensors.safetensors``, everything else
(options, provenance, numbers, strings) to ``result.json``. ``load`` rebuilds
the same class, so a result saved in a script reopens in a notebook.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

import pandas as pd
import torch
from torch import Tensor

from interp.cache import atomic_dir

R = TypeVar("R", bound="Result")
_SEP = "::"


@dataclasses.dataclass(frozen=True)
class Result:
    """Base class: ``table`` (one row per measured thing) plus ``options`` used."""

    table: pd.DataFrame
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    #: Columns shown by the notebook summary; subclasses narrow it.
    summary_columns: ClassVar[tuple[str, ...] | None] = None

    # ------------------------------------------------------------------ display
    def summary(self) -> pd.DataFrame:
        """A short table for notebooks and reports (subclasses override)."""
        table = self.table
        if self.summary_columns:
            table = table[[c for c in self.summary_columns if c in table.columns]]
        return table.head(20)

    def _repr_html_(self) -> str:
        title = f"<b>{type(self).__name__}</b> — {len(self.table)} rows"
        return title + self.summary()._repr_html_()

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write the result to folder ``path`` atomically (replacing an older copy)."""
        path = Path(path)
        tensors: dict[str, Tensor] = {}
        plain: dict[str, Any] = {}
        frames: dict[str, pd.DataFrame] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, pd.DataFrame):
                frames[field.name] = value
            elif isinstance(value, Tensor):
                tensors[field.name] = value
            elif isinstance(value, dict) and value and all(isinstance(v, Tensor) for v in value.values()):
                tensors.update({f"{field.name}{_SEP}{k}": v for k, v in value.items()})
                plain[field.name] = {"__tensor_dict__": list(value)}
            else:
                plain[field.name] = value
        if path.exists():
            import shutil

            shutil.rmtree(path)
        with atomic_dir(path) as tmp:
            meta = {"class": f"{type(self).__module__}.{type(self).__qualname__}", "fields": plain}
            (tmp / "result.json").write_text(json.dumps(meta, indent=2, default=_jsonable))
            for name, frame in frames.items():
                (tmp / f"{name}.json").write_text(_frame_to_json(frame))
            if tensors:
                from safetensors.torch import save_file

                save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                          str(tmp / "tensors.safetensors"))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Self:
        """Read a result saved by :meth:`save` (as this class or the saved subclass)."""
        path = Path(path)
        meta = json.loads((path / "result.json").read_text())
        saved = _import_class(meta.get("class", ""))
        if saved is not None and saved is not cls and issubclass(saved, cls):
            cls = saved  # Result.load(path) reopens the subclass that was saved
        kwargs: dict[str, Any] = {}
        tensors: dict[str, Tensor] = {}
        if (path / "tensors.safetensors").exists():
            from safetensors.torch import load_file

            tensors = load_file(str(path / "tensors.safetensors"))
        for field in dataclasses.fields(cls):
            frame_file = path / f"{field.name}.json"
            if frame_file.exists():
                kwargs[field.name] = _frame_from_json(frame_file.read_text())
            elif field.name in tensors:
                kwargs[field.name] = tensors[field.name]
            elif field.name in meta["fields"]:
                value = meta["fields"][field.name]
                if isinstance(value, dict) and "__tensor_dict__" in value:
                    value = {k: tensors[f"{field.name}{_SEP}{k}"] for k in value["__tensor_dict__"]}
                kwargs[field.name] = value
        return cls(**kwargs)


def _import_class(qualified: str) -> type | None:
    import importlib

    module, _, name = qualified.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _frame_to_json(frame: pd.DataFrame) -> str:
    """Exact JSON for a flat table: Python's float repr round-trips every float64."""
    columns = {str(c): frame[c].tolist() for c in frame.columns}
    dtypes = {str(c): str(frame[c].dtype) for c in frame.columns}
    return json.dumps({"columns": columns, "dtypes": dtypes}, default=_jsonable)


def _frame_from_json(text: str) -> pd.DataFrame:
    data = json.loads(text)
    frame = pd.DataFrame(data["columns"])
    for column, dtype in data["dtypes"].items():
        if dtype != "object" and column in frame:
            frame[column] = frame[column].astype(dtype)
    return frame


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
