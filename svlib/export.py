"""ONNX export of a speaker model (dense or pruned), dynamic batch and time axes.

Two input kinds:

* ``input="features"``: ``(features [B, T, 160] float32, attention_mask [B, T] int64) -> embeddings [B, E]``;
  the caller computes the fbank itself, as ``W2VBertFbank(normalise=...)`` with the model's normalisation,
  which the file's metadata records (``svlib_features_normalise``: ``utterance`` or ``none``).
* ``input="waves"``: ``(waves [B, N] float32, lengths [B] int64) -> embeddings [B, E]``, the whole
  ``SpeakerModel.forward``. ``W2VBertFbank`` is written for speed (in-place ``out=`` ops into preallocated
  buffers, per-batch Python chunking, lengths read on the host), none of which traces into a graph that is
  valid for other shapes. ``OnnxFbank`` below is an export-friendly equivalent of the same math (float64
  framing and DFT as a matmul, float32 mel and log, per-row normalisation over the row's own frames); it is
  tested equal to ``W2VBertFbank``. The exported graph derives the frame count from the padded length N,
  so padding past the longest row only adds masked frames.

The exporter is the TorchScript one (``dynamo=False``); the dynamo exporter is the fallback when it fails.
The encoder's relative_key attention is exported as svlib builds it, the lean form of ``svlib.model.attention``
(q E^T over the 73 distances, a GatherElements by the clamped distance index, then SDPA's ONNX form): under
tracing it runs as one query block, so the graph is valid for every length and holds no (T, T, d) tensor.
The back-end's ``AttentiveStatsPool`` normalises ``h[mask]`` with boolean indexing (needed in training,
where BatchNorm uses batch statistics); in eval mode BatchNorm is an elementwise affine map, so the export
wrapper applies it to all frames and zeroes the padded ones, which is the same function without dynamic
shapes.
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from svlib.features import (
    FEATURE_DIM,
    HOP_LENGTH,
    MEL_FLOOR,
    MIN_SAMPLES,
    N_FFT,
    NORMALISATIONS,
    NORM_EPS,
    PREEMPHASIS,
    STACK,
    WIN_LENGTH,
    W2VBertFbank,
)

__all__ = ["ExportError", "OnnxFbank", "export_onnx", "onnx_metadata", "onnx_session", "run_onnx", "DEFAULT_OPSET"]

DEFAULT_OPSET = 17


class ExportError(ValueError):
    """A model or export request that cannot be turned into ONNX."""


class OnnxFbank(nn.Module):
    """``W2VBertFbank``'s numbers with only static-graph ops: ``(waves [B, N], lengths [B]) -> (feats, mask)``.

    Frames are taken with one gather (frame index x 160 + sample offset), the DC removal and pre-emphasis
    as in ``W2VBertFbank`` (globally pre-emphasised signal minus 0.03 x frame mean; w[0] = 0 hides the
    first sample), and the 512-point zero-padded real DFT as two float64 matmuls with the first 400 rows
    of the DFT matrix (the padding contributes nothing). The spectrum is rounded to float32 before squaring,
    as the extractor does. Output has floor(F_N / 2) frames where F_N counts analysis frames of the padded
    length N; frames past a row's own length are zero and masked.
    """

    def __init__(self, normalise: str = "utterance") -> None:
        super().__init__()
        ref = W2VBertFbank(normalise=normalise)
        self.normalise = ref.normalise
        n = torch.arange(WIN_LENGTH, dtype=torch.float64)[:, None]
        k = torch.arange(N_FFT // 2 + 1, dtype=torch.float64)[None, :]
        angle = 2.0 * math.pi * n * k / N_FFT
        window = ref.window.to(torch.float64)[:, None]
        # The window is folded into the DFT matrices: (w * z) @ C == z @ (w[:, None] * C).
        self.register_buffer("dft_re", window * torch.cos(angle), persistent=False)
        self.register_buffer("dft_im", -window * torch.sin(angle), persistent=False)
        # mel_interleaved has rows (re, im) per bin; every other row is the plain (257, 80) 2^30-scaled matrix.
        self.register_buffer("mel", ref.mel_interleaved[0::2].contiguous(), persistent=False)
        self.register_buffer("offsets", torch.arange(WIN_LENGTH, dtype=torch.int64), persistent=False)

    def forward(self, waves: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        x = waves.to(torch.float64)
        batch_n = x.shape[1]
        # A row shorter than MIN_SAMPLES has no stacked frame: its mean/var divide by zero and the embedding
        # would be NaN. Such rows are computed over their first MIN_SAMPLES samples instead (the padding
        # zeros after them), i.e. as if zero-padded to the minimum; run_onnx refuses a batch narrower than that.
        lengths = torch.clamp(lengths.to(torch.int64), min=MIN_SAMPLES)
        total = torch.div(batch_n - WIN_LENGTH, HOP_LENGTH, rounding_mode="floor") + 1  # analysis frames of N
        starts = torch.arange(total, dtype=torch.int64, device=x.device) * HOP_LENGTH
        index = (starts[:, None] + self.offsets[None, :]).reshape(-1)  # [F * 400]
        emph = torch.cat([torch.zeros_like(x[:, :1]), x[:, 1:] - PREEMPHASIS * x[:, :-1]], dim=1)
        raw = torch.index_select(x, 1, index).reshape(x.shape[0], -1, WIN_LENGTH)
        framed = torch.index_select(emph, 1, index).reshape(x.shape[0], -1, WIN_LENGTH)
        framed = framed - (1.0 - PREEMPHASIS) * raw.mean(dim=-1, keepdim=True)
        re = torch.matmul(framed, self.dft_re).to(torch.float32)
        im = torch.matmul(framed, self.dft_im).to(torch.float32)
        power = re * re + im * im
        logmel = torch.log(torch.clamp(torch.matmul(power, self.mel), min=MEL_FLOOR))  # [B, F, 80]

        frames_per_row = torch.div(lengths - WIN_LENGTH, HOP_LENGTH, rounding_mode="floor") + 1  # [B]
        if self.normalise == "none":
            normed = logmel
        else:
            frame_ids = torch.arange(total, dtype=torch.int64, device=x.device)
            valid = (frame_ids[None, :] < frames_per_row[:, None]).unsqueeze(-1).to(torch.float32)  # [B, F, 1]
            counts = frames_per_row.to(torch.float32).view(-1, 1, 1)
            mean = (logmel * valid).sum(dim=1, keepdim=True) / counts
            centred = logmel - mean
            var = (centred * centred * valid).sum(dim=1, keepdim=True) / (counts - 1.0)
            normed = centred * torch.rsqrt(var + NORM_EPS)

        out_frames = torch.div(total, STACK, rounding_mode="floor")
        feats = normed[:, : out_frames * STACK].reshape(x.shape[0], -1, FEATURE_DIM)
        out_ids = torch.arange(out_frames, dtype=torch.int64, device=x.device)
        mask = (out_ids[None, :] < torch.div(frames_per_row, STACK, rounding_mode="floor")[:, None]).to(torch.int64)
        return feats * mask.unsqueeze(-1).to(feats.dtype), mask


def _pool_eval(pool: nn.Module, x: Tensor, mask: Tensor) -> Tensor:
    """``AttentiveStatsPool.forward`` in eval mode without boolean indexing (see module docstring)."""
    conv1, relu, norm, conv2 = pool.attention
    keep = mask.unsqueeze(-1).to(x.dtype)
    x = x * keep
    h = relu(conv1(x.transpose(1, 2)))
    normed = norm(h) * keep.transpose(1, 2)
    logits = conv2(normed)
    logits = logits.masked_fill(~mask.unsqueeze(1), float("-inf"))
    weights = torch.softmax(logits, dim=2).transpose(1, 2)
    mu = (x * weights).sum(dim=1)
    var = ((x * x) * weights).sum(dim=1) - mu * mu
    sigma = var.clamp(min=1e-5).sqrt()
    return torch.cat([mu, sigma], dim=1)


class _Embedder(nn.Module):
    """features + mask -> embedding, with the MFA pooling in its static-shape eval form."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.frontend = model.frontend
        self.backend = model.backend

    def forward(self, feats: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.frontend.encoder(input_features=feats, attention_mask=attention_mask, output_hidden_states=True)
        states = out.hidden_states
        backend = self.backend
        mask = attention_mask.bool()
        if hasattr(backend, "adapter_layers"):  # AdapterMFA
            x = torch.cat([adapter(states[i]) for adapter, i in zip(backend.adapter_layers, backend.states)], dim=-1)
            return backend.embed_norm(backend.bottleneck(_pool_eval(backend.pooling, x, mask)))
        return backend(states, attention_mask)  # MHFA: masked_fill/softmax only, already static


class _WaveEmbedder(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.fbank = OnnxFbank(model.features.normalise)
        self.embedder = _Embedder(model)

    def forward(self, waves: Tensor, lengths: Tensor) -> Tensor:
        feats, mask = self.fbank(waves, lengths)
        return self.embedder(feats, mask)


def _example_inputs(kind: str, seconds: tuple[float, float] = (3.0, 2.2)) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([int(s * 16000) for s in seconds], dtype=torch.int64)
    waves = 0.1 * torch.randn(len(seconds), int(lengths.max()), generator=g)
    waves[1, int(lengths[1]):] = 0.0
    if kind == "waves":
        return waves, lengths
    return W2VBertFbank()(waves, lengths)


def export_onnx(model: nn.Module, path: str | os.PathLike, input: Literal["waves", "features"] = "waves",
                opset: int = DEFAULT_OPSET, dynamo: bool | None = None) -> Path:
    """Write ``model`` (a ``SpeakerModel`` in eval mode, dense or pruned) as ONNX to ``path``.

    Input/output names: ``waves``/``lengths`` or ``features``/``attention_mask``, and ``embeddings``; batch
    and time axes are dynamic. ``dynamo=None`` tries the TorchScript exporter first and falls back to the
    dynamo one. Returns ``path``.
    """
    if input not in ("waves", "features"):
        raise ExportError(f"export_onnx: input must be 'waves' or 'features', got {input!r}")
    if opset < 17:
        raise ExportError(f"export_onnx: opset {opset} is too old; need 17 or newer")
    if not all(hasattr(model, a) for a in ("frontend", "backend")):
        raise ExportError(f"export_onnx: expected a SpeakerModel, got {type(model).__name__}")
    if getattr(model.features, "normalise", None) not in NORMALISATIONS:
        raise ExportError(f"export_onnx: the model's features are a {type(model.features).__name__}, not "
                          "svlib's W2VBertFbank; only that one has an ONNX form (OnnxFbank)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    wrapper = (_WaveEmbedder(model) if input == "waves" else _Embedder(model)).eval()
    args = _example_inputs(input)
    names = ["waves", "lengths"] if input == "waves" else ["features", "attention_mask"]
    time = "samples" if input == "waves" else "frames"
    axes = {names[0]: {0: "batch", 1: time}, names[1]: {0: "batch"} if input == "waves" else {0: "batch", 1: time},
            "embeddings": {0: "batch"}}
    errors = []
    tries = [False, True] if dynamo is None else [bool(dynamo)]
    try:
        for use_dynamo in tries:
            try:
                with torch.no_grad(), warnings.catch_warnings():
                    # tracer warnings about Python bools from shape checks: those checks hold for all shapes
                    warnings.simplefilter("ignore")
                    kwargs = dict(input_names=names, output_names=["embeddings"], opset_version=opset,
                                  dynamo=use_dynamo)
                    if use_dynamo:
                        from torch.export import Dim

                        b, t = Dim("batch", min=1), Dim(time, min=2)
                        shapes = ({0: b, 1: t}, {0: b}) if input == "waves" else ({0: b, 1: t}, {0: b, 1: t})
                        torch.onnx.export(wrapper, args, str(path), dynamic_shapes=shapes, external_data=False,
                                          **kwargs)
                    else:
                        torch.onnx.export(wrapper, args, str(path), dynamic_axes=axes, **kwargs)
                _stamp(path, {"svlib_input": input, "svlib_exporter": "dynamo" if use_dynamo else "torchscript",
                              "svlib_embed_dim": str(model.embed_dim),
                              # a features-input graph needs W2VBertFbank(normalise=<this>) from the caller
                              "svlib_features_normalise": model.features.normalise})
                return path
            except Exception as err:  # noqa: BLE001 - each exporter fails in its own way; report all
                errors.append(f"{'dynamo' if use_dynamo else 'torchscript'}: {type(err).__name__}: {err}".split("\n")[0])
    finally:
        model.train(was_training)
    raise ExportError(f"export_onnx: could not export to {path} ({'; '.join(errors)})")


def _stamp(path: Path, props: dict[str, str]) -> None:
    """Record how the file was made in its ``metadata_props`` (read back by ``onnx_metadata``)."""
    import onnx

    # external data (models over 2 GB) stays where the exporter put it; only the graph file is rewritten
    proto = onnx.load(str(path), load_external_data=False)
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session for ``path``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_onnx(session, first: Tensor, second: Tensor):
    """Run an exported model on (waves, lengths) or (features, attention_mask); returns a numpy array.

    Waves input: the minimum length is ``MIN_SAMPLES`` (560 samples, 35 ms at 16 kHz); shorter rows are
    embedded as if zero-padded to it (see ``OnnxFbank``), and a batch padded to fewer samples is refused."""
    names = [i.name for i in session.get_inputs()]
    if names[0] == "waves" and first.shape[-1] < MIN_SAMPLES:
        raise ExportError(f"run_onnx: waves are {first.shape[-1]} samples wide; the model needs at least "
                          f"{MIN_SAMPLES} ({1000 * MIN_SAMPLES / 16000:.0f} ms at 16 kHz): zero-pad the batch")
    feed = {names[0]: first.detach().cpu().numpy().astype("float32"),
            names[1]: second.detach().cpu().numpy().astype("int64")}
    return session.run(["embeddings"], feed)[0]
