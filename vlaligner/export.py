"""Export a trained EAVL to ONNX, and run the exported file with onnxruntime.

Axes: b batch (image-sentence pairs), l tokens, n queries, S the model's square input side,
h w the mask grid (S/4).

The ONNX graph has three inputs and two outputs::

    image           (b 3 S S) float32, normalised with the ImageNet mean/std (as the
                    Predictor's ``preprocess`` makes it); S is fixed at export (model.img_size)
    input_ids       (b l) int64 token ids (``model.tokenize``)
    attention_mask  (b l) int64, 1 for real tokens
    ->
    mask_logits     (b 1 S/4 S/4) float32 (sigmoid gives probabilities)
    query_scores    (b n) float32 weights of the n queries (absent for the fixed-kernel head)

b and l are dynamic (l up to the language model's position limit). Export needs the
``export`` extra (``onnx``, ``onnxscript``; ``onnxruntime`` to run or check the file).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = [
    "OnnxWrapper",
    "export_onnx",
    "onnx_session",
    "run_onnx",
    "example_inputs",
    "check_export_matches",
    "DEFAULT_OPSET",
    "ONNX_TOLERANCE",
    "INPUT_NAMES",
]

#: The ONNX opset written by default (tested with onnxruntime's CPU provider).
DEFAULT_OPSET = 18
#: Largest absolute difference of mask logits (and scores) accepted between onnxruntime and
#: PyTorch eager in float32 on the CPU (measured: about 1e-5 on the tiny model).
ONNX_TOLERANCE = 1e-3
#: Names of the graph's inputs, in order.
INPUT_NAMES: Tuple[str, ...] = ("image", "input_ids", "attention_mask")

_INSTALL = "pip install 'vlaligner[export]' (onnx, onnxscript, onnxruntime)"


class OnnxWrapper(nn.Module):
    """Plain tensors in, a tuple of tensors out: the EAVL forward as ONNX sees it.

    Args:
        model: an ``vlaligner.models.EAVL`` (in eval mode for export).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        head = getattr(model, "head", None)
        self.has_scores = not type(head).__name__ == "FixedKernelHead"

    @property
    def output_names(self) -> Tuple[str, ...]:
        return ("mask_logits", "query_scores") if self.has_scores else ("mask_logits",)

    def forward(
        self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> Tuple[torch.Tensor, ...]:
        """``(b 3 S S), (b l), (b l)`` -> ``mask_logits (b 1 S/4 S/4)[, query_scores (b n)]``."""
        out = self.model(image, input_ids, attention_mask)
        if self.has_scores:
            return out.logits, out.query_scores
        return (out.logits,)


def example_inputs(
    model: nn.Module, batch_size: int = 2, sentences: Optional[Sequence[str]] = None, seed: int = 0
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs of the exported graph for ``model``: random normalised images and tokenized text.

    Returns:
        ``image (b 3 S S)`` float32, ``input_ids (b l)`` and ``attention_mask (b l)`` int64, where
        l is ``model.max_length``.
    """
    generator = torch.Generator().manual_seed(seed)
    size = int(model.img_size)
    image = torch.randn(batch_size, 3, size, size, generator=generator)
    if sentences is None:
        base = ["the dog on the left", "a red car", "the person in the middle wearing blue"]
        sentences = [base[i % len(base)] for i in range(batch_size)]
    input_ids, attention_mask = model.tokenize(list(sentences))
    return image, input_ids, attention_mask


def _position_limit(model: nn.Module) -> int:
    config = getattr(getattr(getattr(model, "text_encoder", None), "language_model", None), "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) else 512


def export_onnx(
    model: nn.Module,
    path: Union[str, "os.PathLike[str]"],
    *,
    opset: int = DEFAULT_OPSET,
    batch_size: int = 2,
) -> Path:
    """Write ``model`` as an ONNX file with dynamic batch and sentence length.

    The model is exported in eval mode on the CPU in float32 through ``torch.onnx.export``
    (the ``torch.export``-based exporter). The file is written next to ``path`` under a
    temporary name and renamed at the end, so a failed export never leaves a partial file.

    Args:
        model: an ``vlaligner.models.EAVL``.
        path: the ``.onnx`` file to write.
        opset: ONNX opset version (default :data:`DEFAULT_OPSET`).
        batch_size: batch of the example inputs used for tracing (any b runs afterwards).

    Returns:
        The written path.

    Raises:
        ImportError: onnx / onnxscript are not installed.
        ValueError: an opset below 17 (LayerNormalization) or a model without ``img_size``.
    """
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ImportError(f"ONNX export needs the export extra: {_INSTALL} ({error})") from error
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 17:
        raise ValueError(f"opset must be an int >= 17 (LayerNormalization), got {opset!r}")
    if not hasattr(model, "img_size") or not hasattr(model, "tokenize"):
        raise ValueError(f"model must be an EAVL (img_size, tokenize), got {type(model).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    device = next(model.parameters()).device
    model.eval().to("cpu")
    wrapper = OnnxWrapper(model).eval()
    inputs = example_inputs(model, batch_size=batch_size)
    batch = torch.export.Dim("batch", min=1, max=1024)
    length = torch.export.Dim("length", min=2, max=_position_limit(model))
    dynamic_shapes: Dict[str, Any] = {
        "image": {0: batch},
        "input_ids": {0: batch, 1: length},
        "attention_mask": {0: batch, 1: length},
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with torch.no_grad():
            # Non-strict torch.export first (Python-level tracing, fast, and the shape checks
            # of the model become guards on the symbolic sizes), then the ONNX translation.
            exported = torch.export.export(
                wrapper, inputs, dynamic_shapes=dynamic_shapes, strict=False
            )
            program = torch.onnx.export(
                exported,
                inputs,
                input_names=list(INPUT_NAMES),
                output_names=list(wrapper.output_names),
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        program.save(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
        model.to(device).train(was_training)
    return path


def onnx_session(path: Union[str, "os.PathLike[str]"], *, threads: Optional[int] = None) -> Any:
    """An ``onnxruntime.InferenceSession`` on the CPU for an exported file.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (None: onnxruntime's default, all cores).
    """
    try:
        import onnxruntime as ort
    except ImportError as error:
        raise ImportError(f"running an ONNX file needs onnxruntime: {_INSTALL} ({error})") from error
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def run_onnx(
    session: Any, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> Dict[str, Any]:
    """Run an ``onnx_session`` on torch tensors; returns ``{output name: numpy array}``."""
    feeds = {
        "image": image.detach().cpu().float().numpy(),
        "input_ids": input_ids.detach().cpu().long().numpy(),
        "attention_mask": attention_mask.detach().cpu().long().numpy(),
    }
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def check_export_matches(
    model: nn.Module,
    path: Union[str, "os.PathLike[str]"],
    *,
    batch_sizes: Sequence[int] = (1, 3),
    lengths: Optional[Sequence[int]] = None,
    atol: float = ONNX_TOLERANCE,
) -> float:
    """Run the exported file with onnxruntime and compare it with ``model`` in PyTorch.

    Every combination of ``batch_sizes`` and sentence ``lengths`` (default: ``model.max_length``
    and a shorter one) is run; the sentences differ per row so that the batch is not trivial.

    Returns:
        The largest absolute difference over all outputs and runs.

    Raises:
        ImportError: onnxruntime is not installed.
        AssertionError: a difference above ``atol`` or an output of the wrong shape.
    """
    session = onnx_session(path)
    if lengths is None:
        full = int(getattr(model, "max_length", 17))
        lengths = (full, max(4, full // 2))
    model = model.eval()
    device = next(model.parameters()).device
    worst = 0.0
    for b in batch_sizes:
        for length in lengths:
            image, _, _ = example_inputs(model, batch_size=b, seed=b * 1000 + length)
            words = ["the dog on the left", "a red car", "the tall person in the middle wearing a blue coat"]
            sentences = [words[i % len(words)] for i in range(b)]
            input_ids, attention_mask = model.tokenize(sentences, max_length=length)
            got = run_onnx(session, image, input_ids, attention_mask)
            with torch.no_grad():
                ref = model(image.to(device), input_ids.to(device), attention_mask.to(device))
            pairs = [("mask_logits", ref.logits)]
            if ref.query_scores is not None:
                pairs.append(("query_scores", ref.query_scores))
            for name, expected in pairs:
                expected = expected.float().cpu().numpy()
                if name not in got or got[name].shape != expected.shape:
                    raise AssertionError(
                        f"onnxruntime output {name} has shape "
                        f"{None if name not in got else got[name].shape}, PyTorch {expected.shape} "
                        f"(batch {b}, length {length})"
                    )
                diff = float(abs(got[name] - expected).max())
                if diff > atol:
                    raise AssertionError(
                        f"onnxruntime {name} differs from PyTorch by {diff:.3g} > {atol} "
                        f"(batch {b}, length {length})"
                    )
                worst = max(worst, diff)
    return worst
