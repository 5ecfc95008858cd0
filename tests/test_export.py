"""ONNX export: onnxruntime equals torch (max abs diff <= 1e-4) on real sv-mini audio, dense and pruned,
with batch sizes and lengths other than the ones used for tracing."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from svlib.audio import load_audio
from svlib.features import W2VBertFbank
from svlib.model.attention import attention_implementation, set_attention

from test_speaker import tiny_model

for _mod in ("onnx", "onnxruntime"):
    if importlib.util.find_spec(_mod) is None:
        pytest.skip(f"{_mod} is not installed (pip install onnx onnxruntime onnxscript)", allow_module_level=True)

from svlib.export import ExportError, OnnxFbank, export_onnx, onnx_metadata, onnx_session, run_onnx  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sv-mini"
TOL = 1e-4


@pytest.fixture(scope="module")
def batches():
    """Two padded batches of real audio: 3 LibriSpeech cuts (2.1-4 s) and 1 one-second Arabic word."""
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA} (CI always has it; clone next to ../shared)")
    libri = sorted((DATA / "librispeech_test-other").rglob("*.flac"))[:3]
    waves = [load_audio(p, max_seconds=s) for p, s in zip(libri, (4.0, 2.1, 3.3))]
    word = load_audio(sorted((DATA / "arabic_sc").rglob("*.wav"))[0])

    def pad(ws):
        lengths = torch.tensor([len(w) for w in ws])
        out = torch.zeros(len(ws), int(lengths.max()))
        for i, w in enumerate(ws):
            out[i, :len(w)] = torch.from_numpy(w)
        return out, lengths

    return [pad(waves), pad([word])]


def test_onnx_fbank_equals_w2vbert_fbank(batches):
    ref, ours = W2VBertFbank(), OnnxFbank()
    for waves, lengths in batches:
        f1, m1 = ref(waves, lengths)
        f2, m2 = ours(waves, lengths)
        assert f1.shape == f2.shape and torch.equal(m1, m2)
        assert (f1 - f2).abs().max().item() <= 1e-5


def _check(model, path, batches, kind):
    # what svlib builds, so what is exported: the lean relative_key attention (gather + SDPA, dynamic T)
    assert attention_implementation(model.frontend.encoder) == "lean"
    export_onnx(model, path, input=kind)
    # the TorchScript exporter is tried first and handles relative_key attention with dynamic T
    assert onnx_metadata(path) == {"svlib_input": kind, "svlib_exporter": "torchscript",
                                   "svlib_embed_dim": str(model.embed_dim),
                                   "svlib_features_normalise": model.features.normalise}
    session = onnx_session(path, threads=2)
    fbank = model.features
    for waves, lengths in batches:
        with torch.no_grad():
            ref = model(waves, lengths).numpy()
        if kind == "waves":
            out = run_onnx(session, waves, lengths)
        else:
            out = run_onnx(session, *fbank(waves, lengths))
        assert out.shape == ref.shape
        assert np.abs(out - ref).max() <= TOL, np.abs(out - ref).max()


@pytest.mark.parametrize("kind", ["waves", "features"])
def test_dense_export_matches_torch(batches, tmp_path, kind):
    _check(tiny_model(), tmp_path / f"dense_{kind}.onnx", batches, kind)


def test_raw_logmel_embed_norm_export_matches_torch(batches, tmp_path):
    """The demo's model kind: un-normalised features and a BatchNorm on the embedding (with trained-looking
    running statistics, so that dropping it from the graph would show)."""
    model = tiny_model(backend={"type": "mfa", "adapter_dim": 8, "embed_dim": 16, "embed_norm": True},
                       features={"normalise": "none"})
    with torch.no_grad():
        model.backend.embed_norm.running_mean.uniform_(-2.0, 2.0)
        model.backend.embed_norm.running_var.uniform_(0.5, 3.0)
    _check(model, tmp_path / "raw.onnx", batches, "waves")
    _check(model, tmp_path / "raw_features.onnx", batches, "features")


def test_onnx_fbank_without_normalisation_equals_w2vbert_fbank(batches):
    ref, ours = W2VBertFbank(normalise="none"), OnnxFbank("none")
    for waves, lengths in batches:
        (f1, m1), (f2, m2) = ref(waves, lengths), ours(waves, lengths)
        assert torch.equal(m1, m2) and (f1 - f2).abs().max().item() <= 1e-4 * f1.abs().max().item()


def test_mhfa_export_matches_torch(batches, tmp_path):
    model = tiny_model(backend={"type": "mhfa", "adapter_dim": 8, "heads": 4, "embed_dim": 24})
    _check(model, tmp_path / "mhfa.onnx", batches, "waves")


def test_pruned_export_matches_torch(batches, tmp_path):
    shrink = pytest.importorskip("svlib.pruning.shrink", reason="svlib.pruning.shrink not available")
    model = tiny_model(seed=3)
    g = torch.Generator().manual_seed(0)
    # layer 1 loses all heads and FFN2 (ConstantBlocks); the rest random masks with soft kept values
    shrink.shrink_encoder(model.frontend.encoder, [
        {"heads": torch.tensor([0.0, 0.7]), "ffn1": (torch.rand(64, generator=g) > 0.5) * torch.rand(64, generator=g),
         "conv": (torch.rand(32, generator=g) > 0.3).float()},
        {"heads": torch.zeros(2), "ffn2": torch.zeros(64), "ffn1": (torch.rand(64, generator=g) > 0.4).float()},
    ])
    _check(model.eval(), tmp_path / "pruned.onnx", batches, "waves")


def test_bad_requests(tmp_path):
    model = tiny_model()
    with pytest.raises(ExportError, match="input must be"):
        export_onnx(model, tmp_path / "x.onnx", input="spectrogram")
    with pytest.raises(ExportError, match="opset 13"):
        export_onnx(model, tmp_path / "x.onnx", opset=13)
    with pytest.raises(ExportError, match="expected a SpeakerModel"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx")
    model.features = torch.nn.Identity()
    with pytest.raises(ExportError, match="only that one has an ONNX form"):
        export_onnx(model, tmp_path / "x.onnx")


def test_lean_and_stock_attention_export_alike(batches, tmp_path):
    """The lean attention's graph (no (T, T, d) gather) gives the stock graph's embeddings at other lengths."""
    model = tiny_model(seed=5)
    fbank = W2VBertFbank()
    lean = onnx_session(export_onnx(model, tmp_path / "lean.onnx", input="features"), threads=2)
    set_attention(model.frontend.encoder, "stock")
    stock = onnx_session(export_onnx(model, tmp_path / "stock.onnx", input="features"), threads=2)
    for waves, lengths in batches:
        feats, mask = fbank(waves, lengths)
        assert np.abs(run_onnx(lean, feats, mask) - run_onnx(stock, feats, mask)).max() <= TOL
