"""Using a trained or pruned model: its description, model card, reference-checkpoint import and the
MLflow model registry.

* ``describe(model)``: parameters (total / encoder / back-end), MACs per second of audio (encoder counted
  analytically from the HF config and the per-layer widths by ``svlib.pruning.counting``, back-end counted
  here), and the per-layer kept structure of a pruned encoder.
* ``write_model_card(folder, info)``: ``model_card.json`` (merged with what is already there) and a
  ``README.md`` generated from it, inside the model folder. A ``calibration.json`` in the folder (written
  by ``svlib calibrate-model``) adds its thresholds to the card.
* ``convert_reference_checkpoint``: a ``model_lmft_0.14.pth``-layout checkpoint -> model folder.
* ``register_model`` / ``load_registered``: the folder as an MLflow run artifact plus a registered model
  version, and back; ``register_logged_model``: a stage's logged model (its run's) as a registered version
  with an alias (``models:/NAME@champion``).
* ``load_model``: ``svlib.model.speaker.load_model`` with this module's checks first (dense and pruned
  folders alike: ``load_encoder`` rebuilds shrunk encoders, ``svlib.model.structure``).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from torch import nn

from svlib.files import write_json
from svlib.model.speaker import MANIFEST, ModelFormatError, SpeakerModel, read_manifest, save_model
from svlib.model.speaker import load_model as _load_model
from svlib.model.structure import KINDS, layer_sizes

__all__ = [
    "CALIBRATION_FILE",
    "CARD_FILE",
    "REGISTRY_EXPERIMENT",
    "PackageError",
    "backend_macs",
    "calibrated_on_narrowband",
    "check_registry_name",
    "check_model_folder",
    "convert_reference_checkpoint",
    "describe",
    "enable_pruned_loading",
    "load_model",
    "load_registered",
    "model_digest",
    "read_calibration_thresholds",
    "register_logged_model",
    "register_model",
    "write_model_card",
]

CALIBRATION_FILE = "calibration.json"
NARROWBAND_META = "narrowband"  # calibration meta: {"utterances": narrow-band trial utterances, "of": all of them}
CARD_FILE = "model_card.json"
README_FILE = "README.md"
REGISTRY_EXPERIMENT = "model-registry"
# Reference duration for MACs per second: self-attention is quadratic in time, so the per-second cost grows
# with utterance length; 3 s is the pruning module's reference (svlib.pruning.counting.macs_per_second).
MACS_SECONDS = 3.0
FRAMES_PER_SECOND = 50


class PackageError(ValueError):
    """A model folder, checkpoint or registry request that cannot be used."""


# ------------------------------------------------------------------------------------ loading


def enable_pruned_loading() -> bool:
    """Kept for callers: ``load_encoder`` rebuilds pruned encoders itself (``svlib.model.structure``), so
    there is nothing left to enable. Always True."""
    return True


def load_model(folder: str | os.PathLike) -> SpeakerModel:
    """``svlib.model.speaker.load_model`` for dense and pruned folders; errors are ``ModelFormatError`` etc."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFormatError(f"{folder}: model folder not found")
    check_model_folder(folder)
    from safetensors import SafetensorError

    try:
        return _load_model(folder)
    except SafetensorError as err:  # not a ValueError: would escape the CLI's one-line error handling
        raise ModelFormatError(f"{folder}: unreadable weights file ({err})") from None


def check_model_folder(folder: str | os.PathLike) -> dict:
    """The manifest of ``folder`` after the cheap checks (exists, JSON, format name and version)."""
    return read_manifest(folder)


# Files a model folder holds beside its weights that do not change what it computes: `svlib calibrate-model`
# and `write_model_card` rewrite them in place without making earlier embeddings stale.
NOT_WEIGHTS = (CALIBRATION_FILE, CARD_FILE, README_FILE)


def model_digest(folder: str | os.PathLike) -> str:
    """sha256 of what decides a model folder's embeddings: every file's relative path, size and content
    (weights, encoder config, manifest), in sorted path order.

    Content, not path or modification time: retraining into the same folder changes it, copying the folder
    elsewhere does not. ``NOT_WEIGHTS`` and hidden files (an atomic write's temporary file) are left out.
    Each file is streamed in 1 MiB blocks, so a 2.3 GB encoder costs about a second of reading,
    which also warms the page cache for the model load that follows."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or rel.as_posix() in NOT_WEIGHTS or any(part.startswith(".") for part in rel.parts):
            continue
        content = hashlib.sha256()
        with open(path, "rb") as fh:  # hashlib.file_digest is Python 3.11+; svlib runs on 3.10
            for block in iter(lambda: fh.read(1 << 20), b""):
                content.update(block)
        content = content.hexdigest()
        digest.update(f"{rel.as_posix()}\0{path.stat().st_size}\0{content}\n".encode())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------ describe


def _encoder_macs(config, sizes, seconds: float) -> int:
    """Encoder MACs for one utterance of ``seconds``: svlib.pruning.counting when present, else the same
    formula here (feature projection + per-layer attention, relative_key scores, two FFNs, conv module)."""
    try:
        from svlib.pruning.counting import count_macs

        return int(count_macs(config, sizes, seconds))
    except ImportError:
        pass
    t = max(1, int(round(seconds * FRAMES_PER_SECOND)))
    d = config.hidden_size
    hs = d // config.num_attention_heads
    k = config.conv_depthwise_kernel_size
    total = t * config.feature_projection_input_dim * d
    for s in sizes:
        h = int(s["heads"])
        attn = 4 * t * d * h * hs + 2 * h * t * t * hs
        if config.position_embeddings_type == "relative_key":
            attn += h * t * t * hs
        elif config.position_embeddings_type == "relative":
            attn += (2 * t - 1) * d * h * hs + h * t * (2 * t - 1) * hs
        c = int(s["conv"])
        total += attn + 2 * t * d * (int(s["ffn1"]) + int(s["ffn2"])) + t * d * 2 * c + t * c * k + t * c * d
    return total


def backend_macs(backend: nn.Module, seconds: float) -> int:
    """Back-end multiply-accumulates for one utterance of ``seconds`` (matmuls, 1x1 convs, pooling sums)."""
    t = max(1, int(round(seconds * FRAMES_PER_SECOND)))
    if hasattr(backend, "adapter_layers"):  # AdapterMFA
        s, d, a, e = len(backend.states), backend.hidden_size, backend.adapter_dim, backend.embed_dim
        c = s * a
        adapters = t * s * (d * a + a * a)
        attention = t * (c * a + a * c)          # two 1x1 convolutions of the attentive pooling
        stats = t * 3 * c                        # x*w, x*x*w (x*x reused), summed over time
        return adapters + attention + stats + 2 * c * e
    if hasattr(backend, "cmp_linear_k"):  # MHFA
        s, d = len(backend.states), backend.hidden_size
        c, h, e = backend.compression_dim, backend.heads, backend.embed_dim
        return t * (2 * s * d + 2 * d * c + c * h + h * c) + h * c * e
    raise PackageError(f"backend_macs: unknown back-end {type(backend).__name__}")


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe(model: SpeakerModel, seconds: float = MACS_SECONDS) -> dict[str, Any]:
    """Size and cost of ``model``: parameters, MACs per second of audio (at ``seconds``-long utterances),
    encoder architecture and, when pruned, the kept heads / FFN units / conv channels of every layer."""
    encoder = model.frontend.encoder
    config = encoder.config
    sizes = layer_sizes(encoder)
    dense = {"heads": config.num_attention_heads, "ffn1": config.intermediate_size,
             "ffn2": config.intermediate_size, "conv": config.hidden_size}
    pruned = any(s[k] != dense[k] for s in sizes for k in KINDS)
    enc_macs = _encoder_macs(config, sizes, seconds)
    back_macs = backend_macs(model.backend, seconds)
    dense_macs = _encoder_macs(config, [dict(dense) for _ in sizes], seconds)
    info: dict[str, Any] = {
        "params_total": _count(model),
        "params_encoder": _count(model.frontend),
        "params_backend": _count(model.backend),
        "macs_per_second": (enc_macs + back_macs) / seconds,
        "macs_per_second_encoder": enc_macs / seconds,
        "macs_per_second_backend": back_macs / seconds,
        "macs_reference_seconds": seconds,
        "encoder": {
            "hidden_size": config.hidden_size,
            "num_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "intermediate_size": config.intermediate_size,
            "conv_depthwise_kernel_size": config.conv_depthwise_kernel_size,
            "position_embeddings_type": config.position_embeddings_type,
        },
        "backend": {"type": type(model.backend).__name__, "embed_dim": model.embed_dim},
        # per-utterance normalised (the W2V-BERT extractor's) or raw log-mel: what a caller must feed it
        "features_normalise": getattr(model.features, "normalise", "utterance"),
        "pruned": pruned,
        "dense_layer_sizes": dense,
        "layers": sizes,
    }
    if pruned:
        total = {k: sum(s[k] for s in sizes) for k in KINDS}
        info["kept_fraction"] = {k: total[k] / (dense[k] * len(sizes)) for k in KINDS}
        info["macs_fraction_of_dense_encoder"] = enc_macs / dense_macs
    return info


# ------------------------------------------------------------------------------------ model card


def read_calibration_thresholds(folder: str | os.PathLike) -> dict | None:
    """The ``thresholds`` stored by ``svlib calibrate-model`` in ``folder/calibration.json`` (or None)."""
    path = Path(folder) / CALIBRATION_FILE
    if not path.is_file():
        return None
    from svlib.scoring.calibration import load_calibration

    cal = load_calibration(path)
    thresholds = cal.meta.get("thresholds")
    if not isinstance(thresholds, dict) or "bayes" not in thresholds or "eer" not in thresholds:
        raise PackageError(f"{path}: no 'thresholds' (bayes, eer) in its meta; recreate it with "
                           f"`svlib calibrate-model --model {folder} --data DIR --trials TRIALS`")
    # every number a decision uses, checked here so that `verify` fails before it loads the model
    for kind, keys in (("bayes", ("score", "llr", "prior")), ("eer", ("score",))):
        entry = thresholds[kind]
        if not isinstance(entry, dict):
            raise PackageError(f"{path}: meta.thresholds.{kind} must be a mapping, got {entry!r}")
        for key in keys:
            value = entry.get(key)
            if key not in entry:
                raise PackageError(f"{path}: missing key '{key}' in meta.thresholds.{kind}; recreate it with "
                                   f"`svlib calibrate-model --model {folder} ...`")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise PackageError(f"{path}: meta.thresholds.{kind}.{key} must be a finite number, got {value!r}")
    return {"calibration": cal, **thresholds}


def calibrated_on_narrowband(meta: dict) -> bool:
    """Whether a calibration was fitted on narrow-band audio: at least half of the trial utterances that
    ``svlib calibrate-model`` embedded for it were narrow-band (meta ``narrowband``). A few narrow-band
    utterances among wide-band ones do not teach the calibration how narrow-band pairs of different speakers
    score, so a majority is required. A calibration without the record (older svlib, ``svlib calibrate``)
    counts as wide-band."""
    record = meta.get(NARROWBAND_META)
    if not isinstance(record, dict):
        return False
    narrow, total = record.get("utterances"), record.get("of")
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in (narrow, total)) or total <= 0:
        return False
    return 2 * narrow >= total


def _fmt_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _json_ready(value):
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_model_card(folder: str | os.PathLike, info: dict[str, Any]) -> Path:
    """Write ``model_card.json`` (existing card updated with ``info``) and ``README.md`` into ``folder``.

    Useful keys of ``info``: everything ``describe`` returns, ``name``, ``description``, ``training_data``
    (str or list), ``eer`` (``{trial_list: eer_pct}``), ``mindcf``, ``notes``. Thresholds come from the
    folder's ``calibration.json`` when it exists. Returns the README path.
    """
    folder = Path(folder)
    check_model_folder(folder)
    card_path = folder / CARD_FILE
    card: dict[str, Any] = {}
    if card_path.is_file():
        try:
            card = json.loads(card_path.read_text())
        except json.JSONDecodeError as err:
            raise PackageError(f"{card_path}: not valid JSON ({err})") from None
    card.update(_json_ready(dict(info)))
    card.setdefault("name", folder.resolve().name)
    card["updated"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    thresholds = read_calibration_thresholds(folder)
    if thresholds is not None:
        card["calibration"] = {k: v for k, v in thresholds.items() if k != "calibration"}
    write_json(card_path, card)
    readme = folder / README_FILE
    readme.write_text(_render_card(card), encoding="utf-8")
    return readme


def _render_card(card: dict[str, Any]) -> str:
    lines = [f"# {card['name']}", ""]
    if card.get("description"):
        lines += [str(card["description"]), ""]
    lines += ["svlib speaker-verification model folder (W2V-BERT 2.0 front-end + speaker back-end).", "",
              "```python", "import svlib", f"model = svlib.load_model(\"{card['name']}\")  # this folder",
              "emb = model(waves, lengths)  # waves [B, N] float32 16 kHz in [-1, 1], lengths [B]", "```", "",
              "Command line: `svlib embed --model DIR --wav a.wav --out emb.npz`,"
              " `svlib verify --model DIR a.wav b.wav`, `svlib info DIR`.", "", "## Size and cost", "", "| | |", "|---|---|"]
    for key, label in (("params_total", "parameters (total)"), ("params_encoder", "parameters (encoder)"),
                       ("params_backend", "parameters (back-end)")):
        if key in card:
            lines.append(f"| {label} | {card[key]:,} |")
    if "macs_per_second" in card:
        ref = card.get("macs_reference_seconds", MACS_SECONDS)
        lines.append(f"| MACs per second of audio ({ref:g} s utterances) | {_fmt_count(card['macs_per_second'])} |")
    enc = card.get("encoder")
    if isinstance(enc, dict):
        lines.append(f"| encoder | {enc.get('num_layers')} conformer layers, hidden {enc.get('hidden_size')}, "
                     f"{enc.get('num_attention_heads')} heads, FFN {enc.get('intermediate_size')} |")
    if isinstance(card.get("backend"), dict):
        lines.append(f"| back-end | {card['backend'].get('type')}, {card['backend'].get('embed_dim')}-dim embedding |")
    if card.get("features_normalise"):
        lines.append(f"| input features | log-mel, normalisation: {card['features_normalise']} |")
    if card.get("pruned") and isinstance(card.get("layers"), list):
        dense = card.get("dense_layer_sizes", {})
        lines += ["", "## Pruned structure (kept per layer)", "",
                  "| layer | heads | FFN1 | FFN2 | conv channels |", "|---|---|---|---|---|"]
        for i, s in enumerate(card["layers"]):
            cells = " | ".join(f"{s[k]}/{dense.get(k, '?')}" for k in KINDS)
            lines.append(f"| {i} | {cells} |")
    training = card.get("training_data")
    if training:
        lines += ["", "## Training data", ""]
        lines += [f"- {t}" for t in (training if isinstance(training, list) else [training])]
    if card.get("eer"):
        lines += ["", "## Results", "", "| trial list | EER (%) | minDCF (0.01) |", "|---|---|---|"]
        mindcf = card.get("mindcf") or {}
        for name, eer in card["eer"].items():
            dcf = mindcf.get(name)
            lines.append(f"| {name} | {eer:.3f} | {'' if dcf is None else f'{dcf:.4f}'} |")
    cal = card.get("calibration")
    if cal:
        bayes, eer = cal.get("bayes", {}), cal.get("eer", {})
        lines += ["", "## Decision thresholds (cosine score)", "",
                  f"- Bayes threshold: accept if score >= {bayes.get('score'):.4f} (calibrated LLR >= "
                  f"{bayes.get('llr'):.3f}, prior P(target) = {bayes.get('prior')})",
                  f"- EER threshold: {eer.get('score'):.4f} (EER {eer.get('eer_pct', float('nan')):.2f}% on "
                  f"{cal.get('trials', 'the calibration list')})"]
    else:
        lines += ["", "No calibration yet: `svlib calibrate-model --model DIR --data DATA_DIR --trials TRIALS`."]
    if card.get("notes"):
        lines += ["", "## Notes", "", str(card["notes"])]
    lines += ["", f"_Card updated {card.get('updated', '')}._", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ reference import


def convert_reference_checkpoint(pth: str | os.PathLike, frontend_preset_or_folder: str | os.PathLike,
                                 out_folder: str | os.PathLike, *, lora_alpha: float | None = None,
                                 trusted: bool = False) -> Path:
    """A reference checkpoint (``model_lmft_0.14.pth`` layout) -> model folder with a model card.

    ``frontend_preset_or_folder`` gives the encoder architecture: a preset name or a HF encoder folder
    (only its config.json is read). ``lora_alpha`` is needed only for checkpoints with unmerged LoRA.
    """
    from svlib.model.frontend import PRESETS, FrontendConfig, LoraConfig
    from svlib.model.reference import import_reference_checkpoint

    lora = LoraConfig(alpha=lora_alpha) if lora_alpha is not None else None
    spec = str(frontend_preset_or_folder)
    if spec in PRESETS:
        cfg, root = FrontendConfig(preset=spec, lora=lora), None
    else:
        folder = Path(spec).resolve()
        # FrontendConfig only takes repo-relative folders; the parent becomes the root instead.
        cfg, root = FrontendConfig(folder=folder.name, lora=lora), folder.parent
    model, classifier = import_reference_checkpoint(pth, cfg, root=root, trusted=trusted)
    meta = dict(model.meta)
    meta["num_classes"] = None if classifier is None else int(classifier.shape[0])
    meta["frontend"] = spec
    out = save_model(model, out_folder, meta)
    write_model_card(out, {**describe(model), "description": f"Converted from the reference checkpoint "
                                                              f"{Path(pth).name} (arXiv 2510.04213 recipe).",
                           "source_checkpoint": Path(pth).name})
    return out


# ------------------------------------------------------------------------------------ MLflow registry


def _client(tracker_uri: str | None):
    from mlflow.tracking import MlflowClient

    from svlib.tracking import default_tracking_uri

    uri = tracker_uri or default_tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def check_registry_name(name: str, alias: str | None = None) -> None:
    """A registered model's name (no spaces, '/' or '@': it goes into ``models:/NAME@ALIAS``) and its alias
    (letters, digits, '_' and '-'), else :class:`PackageError`."""
    if not name or any(c.isspace() for c in name) or "/" in name or "@" in name:
        raise PackageError(f"register_model: bad model name {name!r} (no spaces, '/' or '@')")
    if alias is not None and (not alias or not alias.replace("_", "").replace("-", "").isalnum()
                              or alias.lower() == "latest" or alias.lower().startswith("v") and alias[1:].isdigit()):
        # MLflow reserves "latest" and "v<number>" (they address versions in models:/NAME@...)
        raise PackageError(f"register_model: bad alias {alias!r} (letters, digits, '_' and '-'; not 'latest' or "
                           "'v<number>')")


def _new_version(client, name: str, **version) -> int:
    """A new version of registered model ``name`` (created on first use) from ``create_model_version``'s
    keyword arguments; returns its number."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    return int(client.create_model_version(name, **version).version)


def register_logged_model(model_id: str, name: str, alias: str | None = "champion",
                          tracker_uri: str | None = None) -> int:
    """Register the logged model ``model_id`` (a stage's model, ``svlib.tracking.Tracker.log_model``) as a new
    version of ``name``, linked to the run that trained it, and point ``alias`` at it (None: no alias); returns
    the version number. ``models:/NAME@ALIAS`` then loads it (:func:`load_registered`)."""
    check_registry_name(name, alias)
    client, _ = _client(tracker_uri)
    model = client.get_logged_model(model_id)
    version = _new_version(client, name, source=f"models:/{model_id}", run_id=model.source_run_id,
                           model_id=model_id, tags={"stage": model.name})
    if alias is not None:
        client.set_registered_model_alias(name, alias, str(version))
    return version


def register_model(folder: str | os.PathLike, name: str, tracker_uri: str | None = None,
                   tags: dict[str, str] | None = None) -> int:
    """Log ``folder`` as artifact ``model/`` of a run in experiment ``model-registry`` and register it as a
    new version of ``name``; returns the version number. Uses the client API with explicit URIs, so the
    global MLflow tracking URI of the caller is left alone."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PackageError(f"{folder}: model folder not found")
    check_model_folder(folder)
    check_registry_name(name)
    client, uri = _client(tracker_uri)
    experiment = client.get_experiment_by_name(REGISTRY_EXPERIMENT)
    if experiment is None:
        location = None
        if uri.startswith("sqlite:///"):
            # as svlib.tracking.Tracker: artifacts beside the database, not in the working directory
            location = (Path(uri[len("sqlite:///"):]).resolve().parent / "artifacts" / REGISTRY_EXPERIMENT).as_uri()
        experiment_id = client.create_experiment(REGISTRY_EXPERIMENT, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    run_tags = {"kind": "model", "svlib_model_name": name, **(tags or {})}
    run = client.create_run(experiment_id, run_name=f"register-{name}", tags=run_tags)
    run_id = run.info.run_id
    try:
        client.log_artifacts(run_id, str(folder), artifact_path="model")
        card = folder / CARD_FILE
        if card.is_file():
            metrics = json.loads(card.read_text())
            for key in ("params_total", "params_encoder", "macs_per_second"):
                if isinstance(metrics.get(key), (int, float)):
                    client.log_metric(run_id, key, float(metrics[key]))
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return _new_version(client, name, source=f"{run.info.artifact_uri}/model", run_id=run_id)


def load_registered(uri: str, tracker_uri: str | None = None, dst: str | os.PathLike | None = None) -> SpeakerModel:
    """``models:/NAME/VERSION`` (or any MLflow artifact URI of a model folder) -> ``SpeakerModel``.

    The folder is downloaded to ``dst`` (default: a temporary folder, removed after loading)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    _, tracking = _client(tracker_uri)
    if dst is None:
        with tempfile.TemporaryDirectory(prefix="svlib-model-") as tmp:
            return load_registered(uri, tracker_uri=tracking, dst=tmp)
    # models:/ URIs resolve through the registry of the *global* URI, so set it for the download only.
    previous = mlflow.get_tracking_uri()
    previous_registry = mlflow.get_registry_uri()
    mlflow.set_tracking_uri(tracking)
    mlflow.set_registry_uri(tracking)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst))
    except MlflowException as err:
        raise PackageError(f"{uri}: cannot download from {tracking} ({str(err).splitlines()[0]})") from None
    finally:
        mlflow.set_tracking_uri(previous)
        mlflow.set_registry_uri(previous_registry)
    local = Path(local)
    if not (local / MANIFEST).is_file() and (local / "model" / MANIFEST).is_file():
        local = local / "model"
    return load_model(local)
