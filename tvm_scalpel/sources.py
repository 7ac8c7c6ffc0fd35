"""The MODEL argument of the ``scalpel`` command: a reference name, a Python file, or an ONNX file.

- **Reference name** (``lenet-300-100``, ``lenet-5``, ``convnet``, ...): trained and pruned with the
  named recipes (``tvm_scalpel.training.recipes``) on the model's real dataset.
- **Python file** (``my_net.py``) that defines two functions:

  ``model()`` → a ``torch.nn.Module`` taking one float32 tensor [batch, ...]; its weights are used as
  they are (dense, or already pruned: zeros are what the compiler sees).
  ``data()`` → ``(train, test)``, each a ``tvm_scalpel.data.ImageSet`` or a pair of tensors
  ``(inputs float32 [N, ...], labels int64 [N])``. Only ``train``/``prune`` use ``train``.

- **ONNX file** of an (already pruned) model: ``compile``/``bench`` work from its weights alone (no
  data, so no accuracy and no training). Its first graph input is the model input; dimension 0 is
  the batch.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .errors import ScalpelError
from .models import MODELS, build_model, canonical_name
from .models.base import ModelError


class SourceError(ScalpelError, ValueError):
    """A MODEL argument that is none of: a reference name, a Python file, an ONNX file."""


class TensorSet:
    """A (inputs, labels) pair with the two things training and evaluation use: ``len`` and ``batches``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        if len(x) != len(y):
            raise SourceError(f"data(): inputs and labels differ in length ({len(x)} vs {len(y)})")
        self.x, self.y = x.to(torch.float32), y.to(torch.int64)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def batches(self, batch_size: int, shuffle: bool = False,
                generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            idx = order[start:start + batch_size]
            yield self.x[idx], self.y[idx]


def first_batch(data: Any, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` test examples, in order (fewer if the set is smaller)."""
    return next(iter(data.batches(n)))


@dataclass(frozen=True)
class Source:
    kind: str  # "reference" | "python" | "onnx"
    name: str  # for file names and reports
    path: Path | None = None

    @property
    def trainable(self) -> bool:
        return self.kind != "onnx"

    def torch_model(self) -> torch.nn.Module:
        if self.kind == "reference":
            return build_model(self.name).eval()
        if self.kind == "python":
            model = self._module().model()
            if not isinstance(model, torch.nn.Module):
                raise SourceError(f"{self.path}: model() must return a torch.nn.Module, found {type(model).__name__}")
            return model.eval()
        raise SourceError(f"{self.path} is an ONNX model: there is no PyTorch model to train or run eagerly; "
                          "use `scalpel compile` / `scalpel bench` on it, or pass a Python file")

    def data(self) -> tuple[Any, Any]:
        """(train, test) sets with ``len`` and ``batches`` (see module docstring)."""
        if self.kind == "python":
            mod = self._module()
            if not hasattr(mod, "data"):
                raise SourceError(f"{self.path}: define data() returning (train, test) to train or measure accuracy")
            train, test = mod.data()
            return tuple(s if hasattr(s, "batches") else TensorSet(*s) for s in (train, test))
        if self.kind == "reference":
            raise SourceError("reference models take their data from their recipe (training.loop.load_data)")
        raise SourceError(f"{self.path} is an ONNX model: it carries no data")

    def onnx_input(self) -> tuple[str, list[int]]:
        """(name, dims without the batch) of an ONNX model's first real input."""
        import onnx

        m = onnx.load(str(self.path), load_external_data=False)
        inits = {i.name for i in m.graph.initializer}
        inp = next(i for i in m.graph.input if i.name not in inits)
        dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        if any(d <= 0 for d in dims[1:]):
            raise SourceError(f"{self.path}: input {inp.name!r} has a non-static dimension after the batch: {dims}")
        return inp.name, dims[1:]

    def relax(self, batch: int, model: torch.nn.Module | None = None, input_shape: tuple[int, ...] | None = None):
        """The Relax module at ``batch``: ONNX through ``from_onnx``, torch models through torch.export
        (``model`` defaults to ``torch_model()``; ``input_shape`` excludes the batch)."""
        if self.kind == "onnx":
            import onnx
            from tvm.relax.frontend.onnx import from_onnx

            name, dims = self.onnx_input()
            return from_onnx(onnx.load(str(self.path)), shape_dict={name: [batch, *dims]})
        from tvm.relax.frontend.torch import from_exported_program

        model = model if model is not None else self.torch_model()
        if input_shape is None:
            raise SourceError("Source.relax: a torch model needs its input shape")
        x = torch.zeros((batch, *input_shape))
        return from_exported_program(torch.export.export(model.eval(), (x,)))

    def _module(self):
        spec = importlib.util.spec_from_file_location(f"scalpel_user_{self.path.stem}", self.path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        if not callable(getattr(mod, "model", None)):
            raise SourceError(f"{self.path}: expected a function model() returning a torch.nn.Module "
                              "(and data() returning (train, test)); see tvm_scalpel.sources")
        return mod


def resolve(text: str) -> Source:
    """A MODEL argument → Source; a clear error listing the three accepted forms otherwise."""
    path = Path(text)
    if path.suffix == ".py":
        if not path.is_file():
            raise SourceError(f"{text}: no such Python file")
        return Source("python", path.stem, path.resolve())
    if path.suffix == ".onnx":
        if not path.is_file():
            raise SourceError(f"{text}: no such ONNX file")
        return Source("onnx", path.stem, path.resolve())
    try:
        return Source("reference", canonical_name(text))
    except ModelError:
        raise SourceError(f"MODEL {text!r}: expected a reference name ({', '.join(sorted(MODELS))}), "
                          "a Python file defining model() and data(), or an .onnx file") from None


def export_onnx(model: torch.nn.Module, input_shape: tuple[int, ...], path: Path) -> Path:
    """Write ``model`` as ONNX with a dynamic batch (input ``x``), the form ``scalpel compile`` reads."""
    x = torch.zeros((1, *input_shape))
    torch.onnx.export(model.eval(), (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return path


def as_numpy(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().numpy())
