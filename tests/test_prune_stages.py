"""KD-guided pruning stages on sv-mini with the tiny model: prune1 -> shrink -> prune2 -> graft -> ps1,
tracked in a throw-away MLflow store; exact resume of prune1; the random same-size baseline; pipeline checks."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file, save_file

from experiments import graft as graft_stage
from experiments import pipeline
from experiments import prune as P
from experiments import train as train_stage
from experiments.common import DataConfig, max_relative_diff
from svlib.config import ConfigError, from_dict
from svlib.model.speaker import SpeakerModelConfig, build_speaker_model, load_model, save_model
from svlib.pruning import (DistillObjective, MaskConfig, attach_masks, count_params, dense_sizes, layer_sizes,
                           random_masks, shrink_encoder)
from svlib.pruning.counting import KINDS
from svlib.tracking import Tracker

TARGET = 0.5
PRUNE1 = {"stage": "prune1",
          "prune": {"target_sparsity": TARGET, "warmup_steps": 10, "lr_log_alpha": 0.2, "lr_lambda": -0.2},
          "sampling": {"batch_size": 8, "crop_seconds": [1.0, 1.0]},
          "train": {"steps": 30, "log_every": 2, "ckpt_every": 10, "progress": False, "grad_clip": 0.0,
                    "optim": {"lr_frontend": 2e-4}, "schedule": {"kind": "constant"}}}
PRUNE2 = {"stage": "prune2", "sampling": {"batch_size": 8, "crop_seconds": [1.0, 1.0]},
          "train": {"steps": 4, "log_every": 2, "ckpt_every": 2, "progress": False,
                    "optim": {"lr_frontend": 2e-4}, "schedule": {"kind": "constant"}}}
PS1 = {"stage": "ps1", "freeze_frontend": True, "sampling": {"batch_size": 8, "crop_seconds": [1.0, 1.0]},
       "train": {"steps": 2, "log_every": 1, "ckpt_every": 2, "val_every": 2, "progress": False,
                 "schedule": {"kind": "constant"}},
       "eval": {"progress": False}}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory, sv_mini):
    from svlib.corpora.manifest import prepare_manifest

    root = tmp_path_factory.mktemp("prune")
    old = os.getcwd()
    os.chdir(root)  # configs hold repo-relative paths only; the lists' wav paths are relative to here too
    prepare_manifest(sv_mini / "manifest.csv", Path("data"), seed=0)
    data = DataConfig(train="data/train", val="data/val", val_trials="data/val_trials.txt", test="data/test",
                      test_trials={"test": "data/test_trials.txt"})
    # the teacher: a (random) tiny speaker model folder + a 24-speaker head, as stage 2 leaves them
    torch.manual_seed(0)
    teacher = build_speaker_model(from_dict(SpeakerModelConfig, {"frontend": {"preset": "tiny"},
                                                                 "backend": {"type": "mfa", "adapter_dim": 16, "embed_dim": 32}}))
    save_model(teacher, root / "s2" / "model")
    save_file({"weight": torch.randn(24, 32)}, str(root / "s2" / train_stage.HEAD))
    yield {"root": root, "data": data, "teacher": root / "s2"}
    os.chdir(old)


@pytest.fixture(scope="module")
def chain(work):
    """The whole pruned chain, each stage in its own nested MLflow run (as the pipeline does)."""
    root, data = work["root"], work["data"]
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    tracker = Tracker("prune-test", tracking_uri=uri)
    records, run_ids = {}, {}
    with tracker.run("pipeline", tags={"kind": "pipeline"}):
        steps = [
            ("prune1", lambda: P.run_distill(from_dict(P.DistillStageConfig, PRUNE1), data, root / "prune1",
                                             init=work["teacher"], tracker=tracker)),
            ("shrink", lambda: P.run_shrink(root / "prune1", root / "shrink", check_dir=data.load_dir("train"),
                                            tracker=tracker)),
            ("prune2", lambda: P.run_distill(from_dict(P.DistillStageConfig, PRUNE2), data, root / "prune2",
                                             init=root / "shrink", teacher=work["teacher"], tracker=tracker)),
            ("graft", lambda: graft_stage.run(root / "prune2", work["teacher"], root / "graft",
                                              check_dir=data.load_dir("train"), tracker=tracker)),
            ("ps1", lambda: train_stage.run(from_dict(train_stage.TrainStageConfig, PS1), data, root / "ps1",
                                            init=root / "graft", tracker=tracker)),
        ]
        for name, fn in steps:
            with tracker.run(name, nested=True, tags={"stage": name}) as run_id:
                records[name] = fn()
                run_ids[name] = run_id
    return {"records": records, "run_ids": run_ids, "uri": uri, "root": root}


def test_prune1_moves_expected_sparsity_to_the_target_and_logs_it(chain):
    mlflow.set_tracking_uri(chain["uri"])
    client = mlflow.tracking.MlflowClient()
    run_id = chain["run_ids"]["prune1"]
    for key in ("expected_sparsity", "target_sparsity", "lambda1", "lambda2", "distill_l1", "distill_cos",
                "expected_params", "train_loss", "lr_log_alpha", "lr_lambdas"):
        history = client.get_metric_history(run_id, key)
        assert [m.step for m in history] == list(range(2, 31, 2)), key
    sparsity = [m.value for m in client.get_metric_history(run_id, "expected_sparsity")]
    target = [m.value for m in client.get_metric_history(run_id, "target_sparsity")]
    # warm-up: mean target of steps 1-2 is 0.025, of steps 11-30 it is 0.5
    assert target[0] == pytest.approx(TARGET * 0.5 / 10) and target[-1] == TARGET
    assert abs(sparsity[-1] - TARGET) < abs(sparsity[0] - TARGET) - 0.1
    assert client.get_metric_history(run_id, "lr_lambdas")[0].value == pytest.approx(-0.2)
    record = chain["records"]["prune1"]
    metrics = client.get_run(run_id).data.metrics
    assert metrics["achieved_sparsity"] == pytest.approx(record["achieved_sparsity"])
    assert record["achieved_sparsity"] > 0.2
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"structure.json", "structure.png", "config.yaml"} <= artifacts


def test_structure_matches_the_shrunk_and_grafted_encoder(chain):
    root = chain["root"]
    structure = json.loads((root / "prune1" / P.STRUCTURE).read_text())
    graft = load_model(root / "graft" / "model")
    sizes = layer_sizes(graft.frontend.encoder)
    assert [{k: layer[k] for k in KINDS} for layer in structure["layers"]] == sizes
    assert structure["dense"] == [{"layer": i, **d} for i, d in enumerate(dense_sizes(graft.frontend.config))]
    params = sum(p.numel() for p in graft.frontend.parameters())
    assert params == structure["params_encoder"] == count_params(graft.frontend.config, sizes)
    assert structure["achieved_sparsity"] == pytest.approx(1 - params / structure["dense_params_encoder"])
    assert chain["records"]["shrink"]["params_encoder"] == params
    assert chain["records"]["prune2"]["achieved_sparsity"] == pytest.approx(structure["achieved_sparsity"])
    assert (root / "prune1" / P.STRUCTURE_PNG).stat().st_size > 5_000


def test_shrunk_encoder_equals_the_masked_one_on_real_audio(chain, work):
    root = chain["root"]
    assert chain["records"]["shrink"]["shrink_rel_diff"] <= P.SHRINK_TOLERANCE
    # independently of the stage: prune1's dense student + its gates (eval) vs the saved shrunk encoder
    masked = P.load_stage_encoder(root / "prune1").eval()
    mask_set = attach_masks(masked.encoder, MaskConfig())
    mask_set.load_state_dict(load_file(str(root / "prune1" / P.GATES)))
    shrunk = P.load_stage_encoder(root / "shrink").eval()
    waves, lengths = P.check_batch(work["data"].load_dir("test"))
    diff = max_relative_diff(P.encoder_states(masked, waves, lengths), P.encoder_states(shrunk, waves, lengths))
    assert diff <= P.SHRINK_TOLERANCE
    assert sum(p.numel() for p in shrunk.parameters()) < sum(p.numel() for p in masked.parameters())


def test_graft_and_ps1_keep_the_pruned_encoder_and_the_stage2_backend(chain, work):
    root = chain["root"]
    graft = load_model(root / "graft" / "model")
    teacher = load_model(work["teacher"] / "model")
    prune2 = P.load_stage_encoder(root / "prune2")
    for (name, a), b in zip(graft.frontend.state_dict().items(), prune2.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(graft.backend.state_dict().values(), teacher.backend.state_dict().values()):
        assert torch.equal(a, b)
    waves, lengths = P.check_batch(work["data"].load_dir("test"))
    with torch.no_grad():
        emb = graft(waves, lengths)
    assert emb.shape == (4, 32) and torch.isfinite(emb).all()
    # ps1: encoder frozen (unchanged), back-end trained, test trials evaluated
    ps1 = load_model(root / "ps1" / "model")
    for a, b in zip(ps1.frontend.state_dict().values(), graft.frontend.state_dict().values()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(ps1.backend.state_dict().values(),
                                                     graft.backend.state_dict().values()))
    record = chain["records"]["ps1"]
    assert record["test"]["test"]["num_trials"] == 435
    assert record["params_encoder"] == chain["records"]["shrink"]["params_encoder"]


def test_prune1_resumes_exactly(work, tmp_path):
    """Stopped after 3 steps and resumed == uninterrupted, bitwise (gates, multipliers, structure). The loader
    used to draw its DataLoader base seed from the restored RNG on resume, shifting every mask sample."""
    cfg = {**PRUNE1, "train": {**PRUNE1["train"], "steps": 6, "ckpt_every": 3}}
    full = P.run_distill(from_dict(P.DistillStageConfig, cfg), work["data"], tmp_path / "full", init=work["teacher"])
    half = {**cfg, "train": {**cfg["train"], "steps": 3}}
    P.run_distill(from_dict(P.DistillStageConfig, half), work["data"], tmp_path / "split", init=work["teacher"])
    (tmp_path / "split" / "result.json").unlink()  # as if killed after step 3
    resumed = P.run_distill(from_dict(P.DistillStageConfig, cfg), work["data"], tmp_path / "split",
                            init=work["teacher"])
    for key in ("expected_sparsity", "lambda1", "lambda2", "achieved_sparsity"):
        assert resumed[key] == full[key], key
    a, b = load_file(str(tmp_path / "full" / P.GATES)), load_file(str(tmp_path / "split" / P.GATES))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_distillation_uses_the_teacher_models_features(work, tmp_path, monkeypatch):
    """run_distill gives the student the features its teacher model folder was trained on (here raw log-mel):
    distilling a raw-log-mel teacher on normalised inputs would match its states on inputs it never saw."""
    torch.manual_seed(0)
    raw = build_speaker_model(from_dict(SpeakerModelConfig, {
        "frontend": {"preset": "tiny"}, "backend": {"type": "mfa", "adapter_dim": 16, "embed_dim": 32},
        "features": {"normalise": "none"}}))
    save_model(raw, tmp_path / "raw_s2" / "model")
    seen = []

    class RecordingPair(P.DistillPair):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self.features.normalise)

    monkeypatch.setattr(P, "DistillPair", RecordingPair)
    cfg = {**PRUNE2, "train": {**PRUNE2["train"], "steps": 2, "ckpt_every": 2}}
    record = P.run_distill(from_dict(P.DistillStageConfig, cfg), work["data"], tmp_path / "distill",
                           init=tmp_path / "raw_s2")
    assert seen == ["none"] and record["stage"] == "prune2"


def copy_prune1_scaled(root: Path, dest: Path, scale: float) -> Path:
    """prune1's folder with every layer's final LayerNorm scaled: the same structure, states ``scale`` x larger."""
    shutil.copytree(root / "prune1", dest, ignore=shutil.ignore_patterns("ckpt", "result.json"))
    weights = dest / P.ENCODER / "model.safetensors"
    state = load_file(str(weights))
    save_file({k: v * scale if ".final_layer_norm." in k else v for k, v in state.items()}, str(weights),
              metadata={"format": "pt"})
    return dest


def test_shrink_check_is_relative_to_the_states_magnitude(chain, work, tmp_path):
    """A correct shrink of an encoder with large activations differs by more than 1e-4 in absolute terms
    (float32 round-off grows with |h|; the fixed 1e-4 used to reject it); a wrong one is still caught."""
    scaled = copy_prune1_scaled(chain["root"], tmp_path / "prune1_x1e4", 1e4)
    record = P.run_shrink(scaled, tmp_path / "shrink", check_dir=work["data"].load_dir("train"))
    assert record["max_abs_diff"] > 1e-4                      # what the absolute check tripped on
    assert 0 < record["shrink_rel_diff"] <= P.SHRINK_TOLERANCE  # float32 re-association only
    assert record["params_encoder"] == chain["records"]["shrink"]["params_encoder"]


def test_shrink_check_still_catches_a_wrong_shrink(chain, work, tmp_path, monkeypatch):
    """The classic mistake: removing the right units but not folding the kept gates' soft values."""
    def without_folding(encoder, mask_set):
        masks = [{k: (m != 0).float() for k, m in layer.items()} for layer in mask_set.deterministic_masks()]
        mask_set.detach()
        return shrink_encoder(encoder, masks)

    monkeypatch.setattr(P, "prune_model", without_folding)
    with pytest.raises(RuntimeError, match="shrunk encoder differs from the masked one"):
        P.run_shrink(chain["root"] / "prune1", tmp_path / "shrink", check_dir=work["data"].load_dir("train"))


def test_random_baseline_keeps_the_per_kind_counts(work, chain, tmp_path):
    record = P.run_random_prune(chain["root"] / "shrink", work["teacher"], tmp_path / "random", seed=3)
    kd_record = json.loads((chain["root"] / "shrink" / P.STRUCTURE).read_text())
    kd, rnd = kd_record["layers"], json.loads((tmp_path / "random" / P.STRUCTURE).read_text())["layers"]
    for kind in KINDS:
        assert sum(layer[kind] for layer in rnd) == sum(layer[kind] for layer in kd)
    # the stage cut exactly what random_masks draws for its seed ...
    dense = dense_sizes(load_model(work["teacher"] / "model").frontend.config)

    def widths(masks):
        return [{k: int(m[k].sum()) for k in KINDS} for m in masks]

    assert [{k: layer[k] for k in KINDS} for layer in rnd] == widths(random_masks(dense, kd, 3))
    # ... and the widths per layer are random too: a fixed set of seeds (deterministic) gives several
    # structures, not only the KD one (with 2 layers, 16 of 128 FFN units, a draw can repeat it by chance)
    drawn = [widths(random_masks(dense, kd, seed)) for seed in range(8)]
    assert all(sum(w[i][k] for i in range(len(w))) == sum(layer[k] for layer in kd) for w in drawn for k in KINDS)
    assert len({json.dumps(w) for w in drawn}) > 2
    assert any(w != [{k: layer[k] for k in KINDS} for layer in kd] for w in drawn)
    encoder = P.load_stage_encoder(tmp_path / "random")
    assert record["params_encoder"] == sum(p.numel() for p in encoder.parameters())
    assert record["match"] == "kind"
    assert record["params_diff_from_kd"] == record["params_encoder"] - kd_record["params_encoder"]


def kd_kept_units(root: Path) -> list[dict[str, torch.Tensor]]:
    """The units prune1's deterministic masks keep, per layer and kind (indices into the dense widths)."""
    student = P.load_stage_encoder(root / "prune1").eval()
    mask_set = attach_masks(student.encoder, MaskConfig())
    mask_set.load_state_dict(load_file(str(root / "prune1" / P.GATES)))
    return [{k: torch.nonzero(m, as_tuple=True)[0] for k, m in layer.items()}
            for layer in mask_set.deterministic_masks()]


def test_random_baseline_matched_per_layer(work, chain, tmp_path):
    """match: layer -> the KD structure's width in every layer and kind, randomly chosen units, the same size."""
    root = chain["root"]
    record = P.run_random_prune(root / "shrink", work["teacher"], tmp_path / "random", seed=3, match="layer")
    kd_record = json.loads((root / "shrink" / P.STRUCTURE).read_text())
    rnd = json.loads((tmp_path / "random" / P.STRUCTURE).read_text())["layers"]
    assert rnd == kd_record["layers"]
    assert record["match"] == "layer" and record["params_diff_from_kd"] == 0
    assert record["params_encoder"] == kd_record["params_encoder"]
    # the units: not the ones distillation kept, and exactly the ones random_masks draws
    teacher = load_model(work["teacher"] / "model").frontend.encoder
    drawn = random_masks(layer_sizes(teacher), kd_record["layers"], 3, "layer")
    kd_units = kd_kept_units(root)
    partial = [(i, k) for i, layer in enumerate(kd_record["layers"]) for k in KINDS
               if 0 < layer[k] < dense_sizes(teacher.config)[i][k]]
    assert partial
    assert any(not torch.equal(torch.nonzero(drawn[i][k], as_tuple=True)[0], kd_units[i][k]) for i, k in partial)
    i, kind = next((i, k) for i, k in partial if k in ("ffn1", "ffn2"))
    rows = torch.nonzero(drawn[i][kind], as_tuple=True)[0]
    cut = P.load_stage_encoder(tmp_path / "random").encoder
    assert torch.equal(getattr(cut.encoder.layers[i], kind).intermediate_dense.weight,
                       getattr(teacher.encoder.layers[i], kind).intermediate_dense.weight[rows])


def test_pipeline_random_prune_stage_takes_match():
    base = {"name": "x", "out_dir": "exp/x", "data": {}}
    stages = [{"name": "s2", "kind": "use", "path": "exp/demo/s2"},
              {"name": "shrink", "kind": "use", "path": "exp/demo_prune/shrink"},
              {"name": "random", "kind": "random_prune", "init": "shrink", "teacher": "s2", "match": "layer"}]
    cfg = from_dict(pipeline.PipelineConfig, base | {"stages": stages})
    assert cfg.stages[2].match == "layer" and cfg.stages[0].match == "kind"
    with pytest.raises(ConfigError, match="match"):
        from_dict(pipeline.PipelineConfig, base | {"stages": stages[:2] + [{**stages[2], "match": "heads"}]})


def test_distill_stage_config_errors():
    with pytest.raises(ConfigError, match="lr_lambda"):
        from_dict(P.DistillStageConfig, {"prune": {"lr_lambda": 0.1}})
    with pytest.raises(ConfigError, match="val_every"):
        from_dict(P.DistillStageConfig, {"train": {"val_every": 5}})
    with pytest.raises(ConfigError, match="lambda2_init"):
        from_dict(P.DistillStageConfig, {"prune": {"lambda2_init": -1.0}})


def test_prune1_target_ramps_from_the_initial_gates():
    cfg = from_dict(P.DistillStageConfig, {"prune": {"target_sparsity": 0.6, "warmup_steps": 10,
                                                     "warmup_from_initial": True, "warmup_shape": "ease_out",
                                                     "lambda2_init": 5.0}})
    model = build_speaker_model(from_dict(SpeakerModelConfig, {"frontend": {"preset": "tiny"},
                                                               "backend": {"type": "mfa", "adapter_dim": 16,
                                                                           "embed_dim": 32}})).frontend.encoder
    mask_set = attach_masks(model, cfg.prune.masks)
    objective = DistillObjective(cfg.distill, 3, cfg.prune, mask_set)
    start = float(mask_set.expected_sparsity())
    assert 0.0 < start < 0.6
    assert objective.schedule(0) == pytest.approx(start) and objective.schedule(10) == 0.6
    assert objective.lagrangian.lambda2.item() == 5.0 and objective.lagrangian.lambda1.item() == 0.0


def test_pipeline_checks_pruning_stage_references():
    base = {"name": "x", "out_dir": "exp/x", "data": {}}
    ok = [{"name": "s2", "kind": "use", "path": "exp/demo/s2"},
          {"name": "prune1", "kind": "prune", "config": "p.yaml", "init": "s2"},
          {"name": "graft", "kind": "graft", "init": "prune1", "teacher": "s2"}]
    cfg = from_dict(pipeline.PipelineConfig, base | {"stages": ok})
    assert pipeline.stage_dirs(cfg)["s2"].as_posix() == "exp/demo/s2"
    assert pipeline.stage_dirs(cfg)["graft"].as_posix() == "exp/x/graft"
    bad = [(ok[:2] + [{"name": "graft", "kind": "graft", "init": "prune1"}], "needs 'teacher'"),
           (ok[:2] + [{"name": "graft", "kind": "graft", "init": "prune1", "teacher": "s3"}], "not an earlier stage"),
           ([{"name": "s2", "kind": "use"}], "'path'"),
           ([{"name": "p", "kind": "prune", "init": "s2"}], "not an earlier stage")]
    for stages, message in bad:
        with pytest.raises(ConfigError, match=message):
            from_dict(pipeline.PipelineConfig, base | {"stages": stages})


def test_deterministic_constraint_is_straight_through():
    """constrain: deterministic -> the Lagrangian sees the rounded (achieved) sparsity, with the expected gradient."""
    model = build_speaker_model(from_dict(SpeakerModelConfig, {"frontend": {"preset": "tiny"},
                                                               "backend": {"type": "mfa", "adapter_dim": 16,
                                                                           "embed_dim": 32}})).frontend.encoder
    mask_set = attach_masks(model, MaskConfig(head_init_keep=0.3, ffn_init_keep=0.3, conv_init_keep=0.6))
    states = [torch.randn(2, 5, 32) for _ in range(3)]
    outputs = (states, [s + 0.1 for s in states], torch.ones(2, 5))
    losses, grads, extras = {}, {}, {}
    for mode in ("expected", "deterministic"):
        cfg = from_dict(P.DistillStageConfig, {"prune": {"target_sparsity": 0.5, "warmup_steps": 0,
                                                         "lambda1_init": 1.0, "constrain": mode}})
        objective = DistillObjective(cfg.distill, 3, cfg.prune, mask_set).eval()
        mask_set.zero_grad()
        losses[mode], _, extras[mode] = objective(outputs, None)
        losses[mode].backward()
        grads[mode] = [p.grad.clone() for p in mask_set.log_alphas()]
    deterministic = 1 - mask_set.deterministic_params() / mask_set.dense_params
    expected = float(mask_set.expected_sparsity())
    assert abs(deterministic - expected) > 1e-3   # the rounding matters here
    assert extras["deterministic"]["deterministic_sparsity"] == pytest.approx(deterministic)
    assert float(losses["deterministic"] - losses["expected"]) == pytest.approx(deterministic - expected, abs=1e-6)
    assert all(torch.allclose(a, b) for a, b in zip(grads["expected"], grads["deterministic"]))


def test_a_distill_stage_failing_on_rank_zero_after_training_tells_the_other_ranks(work, monkeypatch):
    """The stage's save/record tail runs on rank 0 inside ``rank_zero_result``: when it raises there, rank 0
    broadcasts the failure (the other ranks raise RankError naming it) before re-raising, instead of leaving
    them in the broadcast until the process-group timeout. Rank 0 of a 2-rank group, the broadcast captured."""
    from experiments import common

    sent = []
    monkeypatch.setattr(common, "rank_and_world", lambda: (0, 2))  # what rank_zero_result sees: rank 0 of two
    monkeypatch.setattr(common, "share_from_rank_zero", lambda value: sent.append(value) or value)

    def disk_full(encoder, folder):
        raise OSError(f"{folder}: no space left on device")

    monkeypatch.setattr(P, "save_stage_encoder", disk_full)
    out = work["root"] / "kd_tail_fails"
    cfg = from_dict(P.DistillStageConfig, PRUNE2 | {"stage": "kd", "train": PRUNE2["train"] | {"steps": 2}})
    with pytest.raises(OSError, match="no space left"):
        P.run_distill(cfg, work["data"], out, init=work["teacher"])
    assert len(sent) == 1 and isinstance(sent[0], common._Failure), sent
    assert sent[0].message.startswith("OSError: ") and "no space left on device" in sent[0].message
    assert not (out / "result.json").exists()


# ------------------------------------------------------------------------------ task-loss pruning (issue 19)

class Collect:
    """A tracker stand-in that keeps every logged metric history (step -> value) in memory."""

    def __init__(self):
        self.history: dict[str, dict[int, float]] = {}

    def log_metrics(self, metrics, step=None):
        for key, value in metrics.items():
            self.history.setdefault(key, {})[step] = float(value)

    def log_artifact(self, *args, **kwargs):
        pass


CLASSIFY = {**PRUNE1, "objective": "classification", "head": {"scale": 32.0, "margin": 0.2},
            "train": {**PRUNE1["train"], "log_every": 5, "optim": {"lr_frontend": 2e-4, "lr_backend": 5e-3}}}


def test_classification_objective_prunes_and_trains_backend_and_head(work, tmp_path):
    """prune1 without a teacher: the AAM loss of s2's head on the masked model falls while the Lagrangian moves
    the gates to the target; the trained back-end and head are what graft hands on (teacher: prune1)."""
    data, teacher = work["data"], work["teacher"]
    log = Collect()
    record = P.run_distill(from_dict(P.DistillStageConfig, CLASSIFY), data, tmp_path / "prune1", init=teacher,
                           tracker=log)
    assert record["objective"] == "classification"
    aam = [log.history["aam_loss"][s] for s in sorted(log.history["aam_loss"])]
    assert len(aam) == 6 and aam[-1] < aam[0] - 0.3, aam
    expected = [log.history["expected_sparsity"][s] for s in sorted(log.history["expected_sparsity"])]
    assert abs(expected[-1] - TARGET) < abs(expected[0] - TARGET) - 0.1
    assert "accuracy" in log.history and "distill_l1" not in log.history
    before, after = load_model(teacher / "model"), load_model(tmp_path / "prune1" / "model")
    assert not torch.equal(before.backend.bottleneck.weight, after.backend.bottleneck.weight)
    head0, head1 = (load_file(str(d / train_stage.HEAD))["weight"] for d in (teacher, tmp_path / "prune1"))
    assert head1.shape == head0.shape and not torch.equal(head0, head1)
    # the stage's encoder/ + gates shrink as KD's do; graft takes the back-end and head of prune1 itself
    P.run_shrink(tmp_path / "prune1", tmp_path / "shrink", check_dir=data.load_dir("train"))
    graft_stage.run(tmp_path / "shrink", tmp_path / "prune1", tmp_path / "graft", check_dir=data.load_dir("train"))
    grafted = load_model(tmp_path / "graft" / "model")
    assert torch.equal(grafted.backend.bottleneck.weight, after.backend.bottleneck.weight)
    assert torch.equal(load_file(str(tmp_path / "graft" / train_stage.HEAD))["weight"], head1)
    assert json.loads((tmp_path / "shrink" / P.STRUCTURE).read_text())["achieved_sparsity"] == pytest.approx(
        record["achieved_sparsity"])


def test_objective_config_errors():
    with pytest.raises(ConfigError, match="needs a 'prune:' section"):
        from_dict(P.DistillStageConfig, {"objective": "classification", "head": {}})
    with pytest.raises(ConfigError, match="needs 'head:'"):
        from_dict(P.DistillStageConfig, {"objective": "classification", "prune": {}})
    with pytest.raises(ConfigError, match="classification' only"):
        from_dict(P.DistillStageConfig, {"prune": {}, "head": {}})
    with pytest.raises(ConfigError, match="objective"):
        from_dict(P.DistillStageConfig, {"objective": "mse"})
    with pytest.raises(ConfigError, match="snapshots with objective 'classification'"):
        from_dict(P.DistillStageConfig, {"objective": "classification", "head": {},
                                         "prune": {"target_sparsity": 0.5, "snapshots": [0.3, 0.5]}})


# ------------------------------------------------------------------------------ snapshots (issue 19)

SNAPSHOT_LEVELS = [0.1, 0.2, 0.5]  # the tiny run crosses 0.1 at step 17, 0.2 at 22 and never reaches 0.5
SNAPPED = {**PRUNE1, "prune": {**PRUNE1["prune"], "snapshots": SNAPSHOT_LEVELS},
           "train": {**PRUNE1["train"], "log_every": 1}}


def test_snapshots_are_saved_where_the_expected_sparsity_first_crosses_them(work, tmp_path):
    log = Collect()
    record = P.run_distill(from_dict(P.DistillStageConfig, SNAPPED), work["data"], tmp_path / "prune1",
                           init=work["teacher"], tracker=log)
    # logged at step k: the expected sparsity in step k's forward, i.e. after k - 1 updates
    after_update = {k - 1: v for k, v in log.history["expected_sparsity"].items()}
    after_update[30] = record["expected_sparsity"]  # after the last update (no forward logs it)
    assert [s["snapshot"] for s in record["snapshots"]] == SNAPSHOT_LEVELS
    for snap in record["snapshots"]:
        level, step = snap["snapshot"], snap["step"]
        folder = P.snapshot_dir(tmp_path / "prune1", level)
        if snap["reached"]:
            assert after_update[step] >= level > after_update[step - 1]
        else:  # the run's own target, approached from below: saved from the final state
            assert level == SNAPSHOT_LEVELS[-1] and step == 30 and max(after_update.values()) < level
        assert snap["expected_sparsity"] == pytest.approx(after_update[step], abs=1e-6)
        # a snapshot is a finished prune1 folder: it shrinks, and its structure is what the shrink keeps
        shrunk = P.run_shrink(folder, tmp_path / f"shrink_{level}", check_dir=work["data"].load_dir("train"))
        assert shrunk["achieved_sparsity"] == pytest.approx(snap["achieved_sparsity"])
    steps = [s["step"] for s in record["snapshots"]]
    assert steps == sorted(steps) and len(set(steps)) == 3
    assert all(s["reached"] for s in record["snapshots"][:2])


def test_snapshot_config_errors():
    with pytest.raises(ConfigError, match="must be the run's target_sparsity"):
        from_dict(P.DistillStageConfig, {"prune": {"target_sparsity": 0.8, "snapshots": [0.5, 0.7]}})
    with pytest.raises(ConfigError, match="distinct sparsities"):
        from_dict(P.DistillStageConfig, {"prune": {"target_sparsity": 0.5, "snapshots": [0.5, 0.5]}})
    cfg = from_dict(P.DistillStageConfig, {"prune": {"target_sparsity": 0.7, "snapshots": [0.7, 0.3]}})
    assert cfg.prune.snapshots == [0.3, 0.7]


def test_snapshots_resume_after_a_crash(work, tmp_path, monkeypatch):
    """Killed at step 25 (after some snapshots, after the step-20 checkpoint) and run again: the same snapshots
    at the same steps with the same gates as an uninterrupted run, none written twice."""
    cfg = from_dict(P.DistillStageConfig, SNAPPED)
    full = P.run_distill(cfg, work["data"], tmp_path / "full", init=work["teacher"])
    original = P.SnapshotWriter.__call__

    def crash(self, step):
        original(self, step)
        if step == 25:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(P.SnapshotWriter, "__call__", crash)
    with pytest.raises(KeyboardInterrupt):
        P.run_distill(from_dict(P.DistillStageConfig, SNAPPED), work["data"], tmp_path / "split",
                      init=work["teacher"])
    saved_before = {d.name: d.stat().st_mtime_ns for d in (tmp_path / "split" / P.SNAPSHOTS).iterdir()}
    monkeypatch.setattr(P.SnapshotWriter, "__call__", original)
    resumed = P.run_distill(from_dict(P.DistillStageConfig, SNAPPED), work["data"], tmp_path / "split",
                            init=work["teacher"])
    assert resumed["snapshots"] == full["snapshots"]
    for name, mtime in saved_before.items():  # what was saved before the crash is kept, not rewritten
        assert (tmp_path / "split" / P.SNAPSHOTS / name).stat().st_mtime_ns == mtime
    for level in SNAPSHOT_LEVELS:
        a = load_file(str(P.snapshot_dir(tmp_path / "full", level) / P.GATES))
        b = load_file(str(P.snapshot_dir(tmp_path / "split", level) / P.GATES))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_pipeline_shrinks_a_snapshot_and_checks_stage_fields():
    base = {"name": "x", "out_dir": "exp/x", "data": {}}
    stages = [{"name": "s2", "kind": "use", "path": "exp/demo/s2"},
              {"name": "prune1", "kind": "prune", "config": "p.yaml", "init": "s2"},
              {"name": "shrink_0.5", "kind": "shrink", "init": "prune1", "snapshot": 0.5},
              {"name": "removed", "kind": "control", "control": "encoder_removed", "init": "s2"}]
    cfg = from_dict(pipeline.PipelineConfig, base | {"stages": stages})
    assert cfg.stages[2].snapshot == 0.5 and cfg.stages[3].control == "encoder_removed"
    for bad, message in [({**stages[1], "snapshot": 0.5}, "'snapshot' is for 'shrink'"),
                         ({**stages[3], "control": None}, "'control'"),
                         ({**stages[2], "control": "random_init"}, "'control'")]:
        with pytest.raises(ConfigError, match=message):
            from_dict(pipeline.PipelineConfig, base | {"stages": stages[:1] + [stages[1], bad]})


# ------------------------------------------------------------------------------ controls (issue 19)

def test_encoder_removed_control_leaves_only_the_residual_path(work, tmp_path):
    record = P.run_control(work["teacher"], tmp_path / "removed", "encoder_removed")
    encoder = load_model(work["teacher"] / "model").frontend.encoder
    zero = [{k: 0 for k in KINDS} for _ in dense_sizes(encoder.config)]
    assert record["params_encoder"] == count_params(encoder.config, zero)
    assert record["achieved_sparsity"] == pytest.approx(1 - count_params(encoder.config, zero) /
                                                        count_params(encoder.config, dense_sizes(encoder.config)))
    removed = P.load_stage_encoder(tmp_path / "removed").eval()
    assert all(all(v == 0 for v in s.values()) for s in layer_sizes(removed.encoder))
    # each layer is its residual path: with no block left, layer i's output is its final LayerNorm of what
    # came in, plus the blocks' constant output biases (zero in this fresh teacher)
    waves, lengths = P.check_batch(work["data"].load_dir("train"), 1.0)
    states = P.encoder_states(removed, waves, lengths)
    for layer, before, after in zip(removed.encoder.encoder.layers, states[:-1], states[1:]):
        with torch.no_grad():
            assert torch.allclose(layer.final_layer_norm(before), after, atol=1e-5)
    # graft takes it like any pruned encoder
    graft_stage.run(tmp_path / "removed", work["teacher"], tmp_path / "graft", check_dir=work["data"].load_dir("train"))
    assert load_model(tmp_path / "graft" / "model").frontend.num_states == removed.num_states


def test_random_init_control_is_a_seeded_fresh_encoder(work, tmp_path):
    teacher = load_model(work["teacher"] / "model").frontend.encoder
    a = P.control_encoder(load_model(work["teacher"] / "model").frontend.encoder, "random_init", seed=3)
    b = P.control_encoder(load_model(work["teacher"] / "model").frontend.encoder, "random_init", seed=3)
    c = P.control_encoder(load_model(work["teacher"] / "model").frontend.encoder, "random_init", seed=4)
    key = "encoder.layers.0.ffn1.intermediate_dense.weight"
    sa, sb, sc, st = (m.state_dict()[key] for m in (a, b, c, teacher))
    assert torch.equal(sa, sb) and not torch.equal(sa, sc) and not torch.equal(sa, st)
    assert layer_sizes(a) == layer_sizes(teacher)
    record = P.run_control(work["teacher"], tmp_path / "fresh", "random_init", seed=3)
    assert record["achieved_sparsity"] == 0.0
