"""The ``svlib`` console script (also ``python -m svlib.cli``).

Each subcommand is two small functions, ``_<name>_args(parser)`` and ``_<name>(args) -> int``, listed once
in ``COMMANDS`` at the bottom. Expected failures (a missing file, a malformed list, an unknown utterance)
are exceptions derived from ``ValueError``/``KeyError``/``OSError`` that already name the file and the
problem; ``main`` prints that one line to stderr and exits with 2. ``--traceback`` (or ``SVLIB_TRACEBACK=1``)
shows the full trace when debugging svlib itself.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, NamedTuple

EXIT_USAGE = 2


class Command(NamedTuple):
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---------------------------------------------------------------------------------------- score


def _score_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trials", required=True, type=Path, help="trial list: '1 enroll test' or 'enroll test target'")
    p.add_argument("--embeddings", required=True, type=Path, help="embeddings .npz (arrays utts, embeddings)")
    p.add_argument("--scores-out", type=Path, help="write 'enroll test score' lines here")
    p.add_argument("--asnorm", type=Path, metavar="COHORT.npz", help="AS-norm with this cohort embeddings file")
    p.add_argument("--top-n", type=int, default=300, help="AS-norm cohort size per side (default 300)")
    p.add_argument("--calibration", type=Path, metavar="CALIB.json",
                   help="apply this calibration; scores become LLRs and Cllr is reported")
    p.add_argument("--det", type=Path, metavar="DET.png", help="also write a DET plot")


def _load_scores(args: argparse.Namespace):
    """Trials, table and (normalised) scores: the shared first half of ``score`` and ``calibrate``."""
    from svlib.data.lists import read_trials
    from svlib.scoring.metrics import cosine_scores, load_embeddings
    from svlib.scoring.norm import as_norm

    trials = read_trials(args.trials)
    table = load_embeddings(args.embeddings)
    scores = cosine_scores(table, trials, source=str(args.trials))
    if args.asnorm is not None:
        cohort = load_embeddings(args.asnorm)
        scores = as_norm(table, trials, cohort, top_n=args.top_n, scores=scores)
    return trials, table, scores


def _print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value:>10}")


def _score(args: argparse.Namespace) -> int:
    import numpy as np

    from svlib.scoring.metrics import plot_det, summarize

    trials, table, scores = _load_scores(args)
    calibrated = None
    if args.calibration is not None:
        from svlib.scoring.calibration import load_calibration

        calibrated = load_calibration(args.calibration).apply(scores, table, trials)
    final = scores if calibrated is None else calibrated
    summary = summarize(final, trials.labels)
    rows = [
        ("trials", f"{summary['num_trials']}"),
        ("target trials", f"{summary['num_target']}"),
        ("EER (%)", f"{summary['eer_pct']:.3f}"),
        ("minDCF (p=0.01)", f"{summary['mindcf_0.01']:.4f}"),
        ("minDCF (p=0.05)", f"{summary['mindcf_0.05']:.4f}"),
    ]
    if calibrated is not None:
        from svlib.scoring.calibration import cllr, min_cllr

        rows += [("Cllr (bits)", f"{cllr(calibrated, trials.labels):.4f}"),
                 ("minCllr (bits)", f"{min_cllr(calibrated, trials.labels):.4f}")]
    norm = f"AS-norm top-{args.top_n}" if args.asnorm else "cosine"
    print(f"# {args.trials} | {norm}{' + calibration' if calibrated is not None else ''}")
    _print_table(rows)
    if args.scores_out is not None:
        args.scores_out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.scores_out, "w", encoding="utf-8", newline="\n") as fh:
            for e, t, s in zip(trials.enroll, trials.test, np.asarray(final)):
                fh.write(f"{e} {t} {s:.6f}\n")
    if args.det is not None:
        plot_det({norm: (final, trials.labels)}, args.det)
    return 0


# ------------------------------------------------------------------------------------ calibrate


def _calibrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trials", required=True, type=Path, help="calibration trial list (with labels)")
    p.add_argument("--embeddings", required=True, type=Path, help="embeddings .npz of the trial utterances")
    p.add_argument("--asnorm", type=Path, metavar="COHORT.npz", help="AS-norm first, as 'score' will do")
    p.add_argument("--top-n", type=int, default=300)
    # names are checked by svlib.scoring.calibration (importing it here would slow every `svlib --help`)
    p.add_argument("--quality", nargs="*", default=[], metavar="NAME",
                   help="quality measures added to the score: log_dur_min log_dur_max norm_min norm_max")
    p.add_argument("--p-target", type=float, default=0.05, help="effective prior of the logistic loss")
    p.add_argument("--out", required=True, type=Path, help="calibration JSON to write")


def _calibrate(args: argparse.Namespace) -> int:
    from svlib.scoring.calibration import cllr, fit_calibration, min_cllr

    trials, table, scores = _load_scores(args)
    cal = fit_calibration(scores, trials.labels, table, trials, ["score", *args.quality], args.p_target)
    cal.meta.update({"trials": str(args.trials), "asnorm_top_n": args.top_n if args.asnorm else None})
    cal.save(args.out)
    llrs = cal.apply(scores, table, trials)
    _print_table([("features", ",".join(cal.features)),
                  ("Cllr (bits)", f"{cllr(llrs, trials.labels):.4f}"),
                  ("minCllr (bits)", f"{min_cllr(scores, trials.labels):.4f}")])
    print(f"wrote {args.out}")
    return 0


# ---------------------------------------------------------------------------------------- model use
# embed / verify / calibrate-model / info: a model folder (svlib.package) applied to audio.


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="svlib model folder (svlib_model.json, encoder/, ...)")


def _device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--max-seconds", type=float, default=60.0, help="use at most this much of each file (default 60)")
    p.add_argument("--max-batch-seconds", type=float, default=240.0,
                   help="padded audio per batch; utterances are batched by length (default 240)")


def _check_audio(path: str, max_seconds: float | None) -> float:
    """Seconds used of ``path`` (capped at ``max_seconds``); errors name the file before the model loads."""
    from svlib.audio import AudioError, audio_seconds
    from svlib.features import MIN_SAMPLES, SAMPLE_RATE

    if not os.path.isfile(path):
        raise AudioError(f"{path}: audio file not found")
    seconds = audio_seconds(path)
    if seconds * SAMPLE_RATE < MIN_SAMPLES:
        raise AudioError(f"{path}: too short ({seconds * 1000:.0f} ms); the model needs at least "
                         f"{1000 * MIN_SAMPLES / SAMPLE_RATE:.0f} ms of audio")
    return seconds if max_seconds is None else min(seconds, max_seconds)


def _embed_args(p: argparse.ArgumentParser) -> None:
    _model_arg(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--wav", nargs="+", metavar="WAV", help="audio files (their paths become the utterance ids)")
    src.add_argument("--scp", type=Path, help="Kaldi wav.scp: '<utt> <path>' per line")
    p.add_argument("--out", required=True, type=Path, help="embeddings .npz to write (utts, embeddings, durations)")
    _device_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _embed(args: argparse.Namespace) -> int:
    import numpy as np

    from svlib.data.lists import DataDir, read_scp
    from svlib.evaluate import EvalConfig, extract_embeddings
    from svlib.package import load_model

    wavs = read_scp(args.scp) if args.scp is not None else {w: w for w in args.wav}
    durations = {utt: _check_audio(path, args.max_seconds) for utt, path in wavs.items()}
    data = DataDir(wavs=wavs, utt2spk={u: u for u in wavs}, durations=dict(durations))
    model = load_model(args.model).to(args.device)
    cfg = EvalConfig(max_seconds=args.max_seconds, max_batch_seconds=args.max_batch_seconds,
                     progress=not args.no_progress)
    table = extract_embeddings(model, data, list(wavs), cfg, device=args.device)
    utts = list(wavs)
    from svlib.scoring.metrics import save_embeddings

    save_embeddings(args.out, utts, np.stack([table[u] for u in utts]), durations=[durations[u] for u in utts])
    print(f"wrote {len(utts)} embeddings of dimension {model.embed_dim} to {args.out}")
    return 0


def _verify_args(p: argparse.ArgumentParser) -> None:
    _model_arg(p)
    p.add_argument("wavs", nargs=2, metavar="WAV", help="enrolment and test audio")
    p.add_argument("--threshold-kind", choices=("bayes", "eer"), default="bayes",
                   help="calibrated Bayes threshold (default) or the calibration list's EER threshold")
    p.add_argument("--threshold", type=float, help="use this cosine-score threshold instead of calibration.json")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-seconds", type=float, default=60.0)


def _verify(args: argparse.Namespace) -> int:
    import math

    import torch

    from svlib.audio import load_audio
    from svlib.package import CALIBRATION_FILE, load_model, read_calibration_thresholds

    for path in args.wavs:
        _check_audio(path, args.max_seconds)
    # read before the (slow) model load so that a broken calibration file fails fast
    thresholds = read_calibration_thresholds(args.model) if args.model.is_dir() else None
    model = load_model(args.model).to(args.device)
    waves = [load_audio(p, max_seconds=args.max_seconds) for p in args.wavs]
    lengths = torch.tensor([len(w) for w in waves])
    batch = torch.zeros(2, int(lengths.max()))
    for i, w in enumerate(waves):
        batch[i, :len(w)] = torch.from_numpy(w)
    with torch.no_grad():
        emb = model(batch.to(args.device), lengths.to(args.device)).double().cpu()
    score = float(torch.nn.functional.cosine_similarity(emb[0], emb[1], dim=0))
    print(f"score      {score:.4f}  (cosine)")
    if args.threshold is not None:
        threshold, why = args.threshold, "given with --threshold"
    elif thresholds is None:
        raise FileNotFoundError(
            f"{args.model / CALIBRATION_FILE}: no calibration in the model folder, so no accept/reject threshold; "
            f"create it with `svlib calibrate-model --model {args.model} --data DATA_DIR --trials TRIALS` "
            "or pass --threshold")
    elif args.threshold_kind == "eer":
        t = thresholds["eer"]
        threshold = t["score"]
        why = (f"EER threshold of the calibration list ({t.get('eer_pct', math.nan):.2f}% EER on "
               f"{thresholds.get('trials', '?')}), {args.model / CALIBRATION_FILE}")
    else:
        t = thresholds["bayes"]
        threshold = t["score"]
        cal = thresholds["calibration"]
        print(f"llr        {float(cal.apply([score])[0]):.4f}  (calibrated log-likelihood ratio)")
        why = (f"Bayes threshold: calibrated LLR >= {t['llr']:.3f} = -logit(P(target)={t['prior']}), "
               f"{args.model / CALIBRATION_FILE}")
    print(f"threshold  {threshold:.4f}  ({why})")
    print(f"decision   {'accept' if score >= threshold else 'reject'}  (same speaker: "
          f"{'yes' if score >= threshold else 'no'})")
    return 0


def _calibrate_model_args(p: argparse.ArgumentParser) -> None:
    _model_arg(p)
    p.add_argument("--data", required=True, type=Path, help="Kaldi data dir (wav.scp, utt2spk) of the trial audio")
    p.add_argument("--trials", required=True, type=Path, help="labelled calibration trial list")
    p.add_argument("--prior", type=float, default=0.5,
                   help="P(target) of the Bayes decision threshold: LLR >= -logit(prior) (default 0.5: LLR >= 0)")
    p.add_argument("--p-target", type=float, default=0.5, help="effective prior of the logistic calibration loss")
    _device_arg(p)
    p.add_argument("--no-progress", action="store_true")


def _calibrate_model(args: argparse.Namespace) -> int:
    import math

    from svlib.data.lists import DataDir, ListError, read_trials
    from svlib.evaluate import EvalConfig, extract_embeddings
    from svlib.package import CALIBRATION_FILE, check_model_folder, describe, load_model, write_model_card
    from svlib.scoring.calibration import cllr, fit_calibration, min_cllr
    from svlib.scoring.metrics import compute_eer, cosine_scores

    if not 0.0 < args.prior < 1.0:
        raise ValueError(f"--prior must be in (0, 1), got {args.prior}")
    check_model_folder(args.model)
    trials = read_trials(args.trials)
    data = DataDir.load(args.data, check_files=True)
    unknown = sorted(trials.utterances - set(data.wavs))
    if unknown:
        raise ListError(f"{args.trials}: utterance {unknown[0]!r} is not in {args.data}/wav.scp "
                        f"({len(unknown)} unknown)")
    model = load_model(args.model).to(args.device)
    cfg = EvalConfig(max_seconds=args.max_seconds, max_batch_seconds=args.max_batch_seconds,
                     progress=not args.no_progress)
    table = extract_embeddings(model, data, trials.utterances, cfg, device=args.device)
    scores = cosine_scores(table, trials, source=str(args.trials))
    cal = fit_calibration(scores, trials.labels, features=["score"], p_target=args.p_target)
    slope = float(cal.weights[0])
    if not slope > 0:
        raise ValueError(f"{args.trials}: calibration slope {slope:.4g} is not positive (scores do not separate "
                         "targets from non-targets); cannot derive a threshold")
    llr_threshold = 0.0 - math.log(args.prior / (1.0 - args.prior))  # 0.0 - : no "-0.000" at prior 0.5
    eer, eer_threshold = compute_eer(scores, trials.labels)
    thresholds = {
        "bayes": {"score": (llr_threshold - cal.bias) / slope, "llr": llr_threshold, "prior": args.prior},
        "eer": {"score": eer_threshold, "eer_pct": 100.0 * eer},
        "trials": str(args.trials),
        "num_trials": len(trials),
    }
    llrs = cal.apply(scores)
    cal.meta.update({"thresholds": thresholds, "cllr": cllr(llrs, trials.labels),
                     "min_cllr": min_cllr(scores, trials.labels)})
    path = cal.save(args.model / CALIBRATION_FILE)
    write_model_card(args.model, {**describe(model), "calibration_trials": str(args.trials)})
    _print_table([("trials", f"{len(trials)}"),
                  ("EER (%)", f"{100 * eer:.3f}"),
                  ("EER threshold", f"{eer_threshold:.4f}"),
                  ("Bayes threshold", f"{thresholds['bayes']['score']:.4f}"),
                  ("Cllr (bits)", f"{cal.meta['cllr']:.4f}"),
                  ("minCllr (bits)", f"{cal.meta['min_cllr']:.4f}")])
    print(f"wrote {path} (Bayes threshold at LLR >= {llr_threshold:.3f}, P(target) = {args.prior})")
    return 0


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, metavar="DIR", help="svlib model folder")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.add_argument("--seconds", type=float, default=3.0,
                   help="utterance length for MACs per second (attention is quadratic in time; default 3)")


def _info(args: argparse.Namespace) -> int:
    import json

    from svlib.package import describe, load_model, read_calibration_thresholds

    if args.seconds <= 0:
        raise ValueError(f"--seconds must be positive, got {args.seconds}")
    model = load_model(args.model)
    info = describe(model, seconds=args.seconds)
    thresholds = read_calibration_thresholds(args.model)
    if args.json:
        if thresholds is not None:
            info["calibration"] = {k: v for k, v in thresholds.items() if k != "calibration"}
        print(json.dumps(info, indent=2))
        return 0
    enc = info["encoder"]
    print(f"# {args.model}")
    _print_table([
        ("parameters (total)", f"{info['params_total']:,}"),
        ("parameters (encoder)", f"{info['params_encoder']:,}"),
        ("parameters (back-end)", f"{info['params_backend']:,}"),
        (f"MACs/s of audio ({args.seconds:g} s utts)", f"{info['macs_per_second'] / 1e6:.2f}M"),
        ("  encoder", f"{info['macs_per_second_encoder'] / 1e6:.2f}M"),
        ("  back-end", f"{info['macs_per_second_backend'] / 1e6:.2f}M"),
        ("encoder", f"{enc['num_layers']}x{enc['hidden_size']}"),
        ("back-end", f"{info['backend']['type']}/{info['backend']['embed_dim']}"),
        ("pruned", "yes" if info["pruned"] else "no"),
    ])
    dense = info["dense_layer_sizes"]
    print(f"{'layer':>5}  {'heads':>7}  {'ffn1':>9}  {'ffn2':>9}  {'conv':>9}")
    for i, s in enumerate(info["layers"]):
        print(f"{i:>5}  " + "  ".join(f"{f'{s[k]}/{dense[k]}':>{7 if k == 'heads' else 9}}"
                                      for k in ("heads", "ffn1", "ffn2", "conv")))
    if thresholds is not None:
        bayes, eer = thresholds["bayes"], thresholds["eer"]
        print(f"calibrated thresholds: Bayes {bayes['score']:.4f} (LLR >= {bayes['llr']:.3f}), EER {eer['score']:.4f}")
    else:
        print("no calibration.json (svlib calibrate-model creates one)")
    return 0


# ------------------------------------------------------------------------------------- registry

COMMANDS: list[Command] = [
    Command("score", "cosine-score a trial list and print EER / minDCF", _score_args, _score),
    Command("calibrate", "train a (quality-measure) score calibration on a labelled trial list",
            _calibrate_args, _calibrate),
    Command("embed", "embed audio files with a model folder (batched by length) into an .npz", _embed_args, _embed),
    Command("verify", "score two audio files and accept/reject at the model's calibrated threshold",
            _verify_args, _verify),
    Command("calibrate-model", "fit the model folder's score calibration and thresholds on a trial list",
            _calibrate_model_args, _calibrate_model),
    Command("info", "parameters, MACs per second of audio and per-layer (pruned) structure of a model folder",
            _info_args, _info),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svlib", description="Speaker verification toolkit")
    parser.add_argument("--traceback", action="store_true", help="show the Python traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the subcommand, return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, KeyError, OSError) as err:
        if args.traceback or os.environ.get("SVLIB_TRACEBACK"):
            raise
        # KeyError str() is the repr of its key; svlib's own KeyErrors (MissingEmbeddingError) print plainly
        msg = str(err) if not type(err) is KeyError else f"missing key {err}"
        if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in msg:
            msg = f"{err.filename}: {msg}"
        print(f"svlib {args.command}: error: {' '.join(msg.split())}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
