"""`harmonize ...`: the command line. Each subcommand parses its options and calls one
library function; failures exit non-zero with a one-line reason."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from harmonize import __version__


def _synth(args: argparse.Namespace) -> int:
    from harmonize.synth import cohort_sizes, generate

    per_site = (cohort_sizes(args.sites, args.per_site, args.size_spread, args.seed)
                if args.size_spread > 0 else args.per_site)
    prevalence = args.prevalence[0] if args.prevalence and len(args.prevalence) == 1 \
        else args.prevalence
    info = generate(args.out, sites=args.sites, per_site=per_site, size=args.size,
                    modality=args.modality, seed=args.seed, no_shift=args.no_shift,
                    reference_site=args.reference_site, progress=not args.quiet,
                    prevalence=prevalence, finding_scale=args.finding_scale,
                    images_per_patient=args.images_per_patient, nodes=args.nodes)
    grouped = f" in {len(info['nodes'])} nodes" if info["nodes"] else ""
    print(f"wrote {info['n_images']} images of {info['n_patients']} patients at "
          f"{len(info['sites'])} sites{grouped} to {args.out} (reference site "
          f"{info['reference_site']}; manifest {Path(args.out) / 'manifest.csv'})")
    return 0


def _train_classical(args: argparse.Namespace) -> int:
    """histogram-matching / fourier: fit on the manifest's images, save the checkpoint."""
    from harmonize.data.intensity import IntensityPolicy
    from harmonize.data.manifest import load_manifest
    from harmonize.fit import fit_and_save
    from harmonize.translators import TRANSLATORS

    cls = TRANSLATORS[args.kind]
    params = {k: getattr(args, k) for k in cls.param_names() if hasattr(args, k)}
    model = cls(**params, policy=IntensityPolicy(mode=args.intensity, bits=args.bits))
    model.check_params()
    df = load_manifest(args.data, mask_column=args.mask_column)
    out = fit_and_save(model, df, args.data, args.reference_site, args.out,
                       progress=not args.quiet)
    masks = (f" --mask-column {args.mask_column}"
             if model.uses_masks and args.mask_column else "")
    print(f"saved {args.kind} translator to {out} (apply: harmonize apply --model {out}"
          f"{masks} IN OUT)")
    return 0


def _classical_parser(kinds, kind: str, parents: list, help_text: str, example_out: str
                      ) -> argparse.ArgumentParser:
    """`harmonize train KIND` for a classical translator, with the flags all of them take."""
    parser = kinds.add_parser(
        kind, formatter_class=argparse.RawDescriptionHelpFormatter, parents=parents,
        help=help_text, epilog=f"example:\n  harmonize train {kind} --data "
        f"data/synth/manifest.csv --reference-site site_a --out {example_out}")
    parser.add_argument("--data", required=True, help="manifest CSV")
    parser.add_argument("--reference-site", required=True)
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--polarity", choices=["auto", "keep"], default="auto",
                        help="flip images whose grey scale is inverted relative to the "
                             "reference")
    parser.add_argument("--intensity", choices=["auto", "bit-depth", "percentile"],
                        default="auto", help="intensity policy (harmonize.data.intensity)")
    parser.add_argument("--bits", type=int, default=None, help="force the stored bit depth")
    parser.add_argument("--mask-column", default=None,
                        help="manifest column holding ROI masks, for kinds that use them "
                             "(default: 'mask' if present)")
    parser.set_defaults(func=_train_classical)
    return parser


def _apply(args: argparse.Namespace) -> int:
    from harmonize.apply import apply_translator
    from harmonize.translators import load_translator

    translator = load_translator(args.model)
    if args.precision is not None:
        set_precision(translator, args.precision)
    s = apply_translator(translator, args.input, args.output, resume=args.resume,
                         batch_size=args.batch_size, io_workers=args.io_workers,
                         progress=not args.quiet, mask_column=args.mask_column)
    not_images = f" ({s.not_images} not images)" if s.not_images else ""
    print(f"{s.ok} written, {s.skipped} skipped{not_images}, {s.errors} failed; "
          f"log: {s.log_path}")
    if s.total == 0:
        print(f"harmonize: error: no files found in {args.input}", file=sys.stderr)
        return 1
    if s.ok + s.skipped - s.not_images == 0:
        print(f"harmonize: error: no file could be harmonized (see {s.log_path})",
              file=sys.stderr)
        return 1
    if args.strict and s.errors:
        print(f"harmonize: error: {s.errors} file(s) failed and --strict is set "
              f"(first: {s.error_files[0]})", file=sys.stderr)
        return 1
    return 0


def set_precision(translator, precision: str) -> None:
    """--precision for the network translators; the others have no arithmetic to change."""
    if "precision" in translator.param_names():
        translator.set_params(precision=precision)
    else:
        print(f"note: --precision does not apply to the {translator.kind} translator",
              file=sys.stderr)


def _shift_report(args: argparse.Namespace) -> int:
    from harmonize.radiomics.shift_report import run_shift_report

    s = run_shift_report(args.data, args.out, compare_with=args.compare,
                         reference_site=args.reference_site, mask_column=args.mask_column,
                         workers=args.workers, cache_dir=args.cache_dir,
                         ray_address=args.ray_address, progress=not args.quiet)
    if args.compare:
        for row in s["change"][:3]:
            print(f"  {row['measure']}: {row['before']:.3f} -> {row['after']:.3f}")
    else:
        print(f"  site AUC {s['site_auc']:.3f} (chance 0.5), balanced accuracy "
              f"{s['site_balanced_accuracy']:.3f} (chance {s['chance_balanced_accuracy']:.3f}), "
              f"shifted features {s['shifted_feature_share']:.0%} of {s['n_features']}")
    print(f"  ROI: {s['roi']}")
    for note in s.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    if s["n_errors"]:
        print(f"  {s['n_errors']} image(s) could not be measured: see {args.out}/errors.csv")
    print(f"report: {Path(args.out) / 'report.html'}")
    return 0


def _study(args: argparse.Namespace) -> int:
    from harmonize.configs import with_overrides
    from harmonize.study.config import load_study_config
    from harmonize.study.run import run_study

    overrides = {"out": args.out, "progress": False if args.quiet else None}
    out = run_study(load_study_config(args.config, with_overrides(overrides, args.overrides)))
    print(f"arms: {out / 'arms.csv'}\ndifferences: {out / 'differences.csv'}\n"
          f"report: {out / 'report.html'}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from harmonize.configs import with_overrides
    from harmonize.evaluation.config import load_eval_config
    from harmonize.evaluation.evaluate import run_evaluation

    overrides = {"out": args.out, "progress": False if args.quiet else None}
    out = run_evaluation(load_eval_config(args.config, with_overrides(overrides,
                                                                     args.overrides)))
    print(f"results: {out / 'results.csv'}\nreport: {out / 'report.html'}")
    return 0


def _federated(args: argparse.Namespace) -> int:
    from harmonize.configs import with_overrides
    from harmonize.federated.config import load_federated_config
    from harmonize.federated.run import run_federated

    overrides = {"manifest": args.data, "reference_site": args.reference_site,
                 "out": args.out, "rounds": args.rounds,
                 "progress": False if args.quiet else None,
                 "resume": True if args.resume else None}
    s = run_federated(load_federated_config(args.config, with_overrides(overrides,
                                                                        args.overrides)))
    print(f"{s['rounds']} rounds over {s['nodes']} nodes ({', '.join(s['node_names'])}) in "
          f"{s['wall_seconds']:.0f} s" + (f"; epsilon {s['epsilon']:.2f} per "
                                          f"{s.get('epsilon_unit') or 'hospital'} at delta "
                                          f"{s['delta']:g}" if s.get("epsilon") else ""))
    skipped = s.get("rounds_not_aggregated") or []
    if skipped:
        print(f"harmonize: error: {len(skipped)} of {s['rounds']} rounds had fewer than "
              f"{s['nodes']} replies and left the model unchanged (rounds "
              f"{', '.join(map(str, skipped))})" + ("" if s["model"] else "; no model written"),
              file=sys.stderr)
    for f in s["failures"]:
        print(f"harmonize: error: round {f['round']}: {f['reason']}", file=sys.stderr)
    if s["model"]:
        print(f"model: {s['model']}\nrounds: {Path(args.out) / 'rounds.csv'}")
    return 1 if s["failures"] or not s["model"] else 0


def _demo(args: argparse.Namespace) -> int:
    from harmonize.demo import run_demo

    result = run_demo(args.out, sites=args.sites, per_site=args.per_site, size=args.size,
                      modality=args.modality, seed=args.seed, quick=args.quick,
                      progress=not args.quiet)
    test_site = result["sites"][-1]
    for row in result["evaluation"]:
        if row["protocol"] == "external":
            name = row["regime"] + (f" ({row['translator']})" if row["translator"] else "")
            print(f"  {row['classifier']} {name}: AUC on unseen {test_site} {row['auc']:.3f} "
                  f"[{row['auc_lo']:.3f}, {row['auc_hi']:.3f}]")
    for name, shift in result["site_shift"].items():
        print(f"  {name}: radiomics site AUC {shift['site_auc']['before']:.3f} -> "
              f"{shift['site_auc']['after']:.3f}")
    print(f"report: {Path(args.out) / 'report.html'}")
    return 0


def _add_set_option(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help=f"any config value, e.g. --set {example} "
                   "(repeatable)")


def _fractions(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers like 0.5,0.8") from None


def _count_range(text: str) -> int | tuple[int, int]:
    """"3" or "2-5"."""
    try:
        parts = [int(v) for v in text.split("-")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a count (3) or a range (2-5)") from None
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return (parts[0], parts[1])
    raise argparse.ArgumentTypeError(f"{text!r}: give a count (3) or a range (2-5)")


def _add_synth_options(p: argparse.ArgumentParser, per_site: int, size: int = 256) -> None:
    p.add_argument("--sites", type=int, default=4,
                   help="number of sites; the first is the reference (default 4)")
    p.add_argument("--per-site", type=int, default=per_site,
                   help=f"patients per site (default {per_site}; one image each unless "
                        "--images-per-patient)")
    p.add_argument("--size", type=int, default=size,
                   help=f"image side in pixels (default {size})")
    p.add_argument("--modality", choices=["xray", "bonescan"], default="xray",
                   help="X-ray-like or bone-scan-like phantoms (default xray)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of phantoms and acquisitions: same seed, same images")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="harmonize", formatter_class=fmt,
        description="Harmonize multi-site medical images (X-rays, bone scans).",
        epilog="example:\n  harmonize demo --out demo_out")
    parser.add_argument("--version", action="version", version=f"harmonize {__version__}")
    debug_help = "show the full traceback of an error (or set HARMONIZE_DEBUG=1)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    # also after the subcommand; SUPPRESS keeps a subcommand from resetting the top flag
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", formatter_class=fmt, parents=[common],
                       help="write the synthetic multi-site benchmark",
                       epilog="example:\n  harmonize synth data/synth --sites 4 --per-site 50")
    p.add_argument("out", help="output folder")
    _add_synth_options(p, per_site=50)
    p.add_argument("--no-shift", action="store_true",
                   help="negative control: every site uses the reference acquisition")
    p.add_argument("--reference-site", default=None, help="default: the first site")
    p.add_argument("--prevalence", type=_fractions, default=None, metavar="P1,P2,...",
                   help="share of positives per site, e.g. 0.5,0.8,0.2,0.5 for a strong "
                        "site-label shortcut, or one share for all (default: drawn in 0.2-0.5)")
    p.add_argument("--finding-scale", type=float, default=1.0,
                   help="enlarge the finding by this radius factor (default 1)")
    p.add_argument("--size-spread", type=float, default=0.0,
                   help="unequal sites: patients per site log-normal around --per-site with "
                        "this log-sd, e.g. 0.6 (default 0: equal)")
    p.add_argument("--images-per-patient", type=_count_range, default=1, metavar="N|LO-HI",
                   help="images of each patient (a count, or a range drawn per patient, "
                        "e.g. 2-5; default 1)")
    p.add_argument("--nodes", type=int, default=None,
                   help="group the sites, in order, into this many federation nodes "
                        "(a node column)")
    p.set_defaults(func=_synth)

    p = sub.add_parser("train", formatter_class=fmt, help="train a translator or classifier",
                       epilog="examples:\n  harmonize train histogram-matching --data "
                              "data/synth/manifest.csv --reference-site site_a --out models/hm"
                              "\n  harmonize train cyclegan --config configs/cyclegan/quick.yaml "
                              "--data data/synth/manifest.csv --reference-site site_a "
                              "--out runs/cg\n(harmonize train KIND --help for each kind)")
    kinds = p.add_subparsers(dest="kind", required=True)
    h = _classical_parser(kinds, "histogram-matching", [common],
                          "quantile histogram matching to the reference site", "models/hm")
    h.add_argument("--per", choices=["image", "site"], default="image",
                   help="match each image's own histogram, or its site's average")
    h.add_argument("--n-quantiles", type=int, default=256,
                   help="quantile landmarks (default 256)")
    f = _classical_parser(kinds, "fourier", [common], "Fourier-amplitude matching (FDA / "
                          "FedDG style) to the reference site", "models/fourier --beta 0.01")
    f.add_argument("--beta", type=float, default=0.01,
                   help="low-frequency block, fraction of the shorter side (default 0.01)")
    f.add_argument("--strength", type=float, default=1.0,
                   help="1: the reference amplitude; below 1: interpolate towards it")
    f.add_argument("--grid", type=int, default=256, help="amplitude grid side (default 256)")
    t = _classical_parser(kinds, "texture-matching", [common],
                          "per-site ROI histogram, sharpness and noise texture matched to the "
                          "reference site (radiomics harmonization; every site, the "
                          "reference's too)", "models/texture")
    t.add_argument("--spectrum", choices=["site", "sharpen", "off"], default="sharpen",
                   help="filter each site's mean ROI spectrum onto the reference's "
                   "(sharpen: only where the site's is weaker; keeps findings' contrast)")
    t.add_argument("--noise", choices=["reference", "keep"], default="reference",
                   help="replace the fine band by noise drawn from the reference site's")
    t.add_argument("--noise-sigma", type=float, default=1.0,
                   help="fine band: what a Gaussian blur of this many pixels removes")
    t.add_argument("--fingerprints", choices=["remove", "everywhere", "keep"],
                   default="remove", help="inpaint borders and markers outside masks "
                   "('remove'), also inside them ('everywhere'), or not at all")
    t.add_argument("--seed", type=int, default=0, help="seed of the drawn noise")

    from harmonize.translators.cyclegan import command as cyclegan_command

    for kind, help_text in cyclegan_command.KINDS.items():  # one training loop, three kinds
        c = kinds.add_parser(kind, formatter_class=fmt, parents=[common], help=help_text,
                             epilog=f"example:\n  {cyclegan_command.EXAMPLES[kind]}")
        cyclegan_command.add_train_arguments(c)
        c.set_defaults(func=cyclegan_command.run_from_args)

    from harmonize.translators.diffusion import command as diffusion_command

    d = kinds.add_parser("diffusion", formatter_class=fmt, parents=[common],
                         help="diffusion prior(s) for SDEdit / DDIB (diffusers)",
                         epilog=f"example:\n  {diffusion_command.EXAMPLE}")
    diffusion_command.add_train_arguments(d)
    d.set_defaults(func=diffusion_command.run_from_args)

    from harmonize.classify import command as classifier_command

    k = kinds.add_parser("classifier", formatter_class=fmt, parents=[common],
                         help="downstream classifier: CNN, ResNet18, DenseNet121, ViT",
                         epilog=f"example:\n  {classifier_command.EXAMPLE}")
    classifier_command.add_train_arguments(k)
    k.set_defaults(func=classifier_command.run_from_args)

    p = sub.add_parser(
        "apply", formatter_class=fmt, parents=[common],
        help="harmonize a folder or manifest with a translator",
        epilog="examples:\n  harmonize apply --model models/hm scans/ harmonized/\n"
               "  harmonize apply --model identity --resume scans/ copy/")
    p.add_argument("--model", required=True, help="checkpoint directory, or 'identity'")
    p.add_argument("input", help="folder or manifest CSV")
    p.add_argument("output", help="output folder (mirrors the input tree)")
    p.add_argument("--resume", action="store_true", help="skip outputs that already exist")
    p.add_argument("--mask-column", default=None,
                   help="manifest column holding ROI masks, for translators that use them "
                        "(texture-matching; default: 'mask' if present)")
    p.add_argument("--strict", action="store_true", help="exit non-zero if any file failed")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--io-workers", type=int, default=2, help="threads decoding/writing files")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None,
                   help="network arithmetic (CycleGAN, diffusion): auto = bf16 where the "
                        "CPU/GPU runs it natively; fp32 turns bf16 off (default: the "
                        "checkpoint's setting)")
    p.set_defaults(func=_apply)

    p = sub.add_parser(
        "shift-report", formatter_class=fmt, parents=[common],
        help="radiomics site-shift report (HTML + CSV + JSON)",
        epilog="examples:\n  harmonize shift-report data/synth/manifest.csv --out shift\n"
               "  harmonize shift-report data/synth/manifest.csv --compare harmonized/ "
               "--out shift_after")
    p.add_argument("data", help="manifest CSV, or a folder ROOT/<site>/[<label>/]...")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--compare", default=None,
                   help="harmonized copy mirroring DATA's tree (from harmonize apply)")
    p.add_argument("--reference-site", default=None, help="default: the largest site")
    p.add_argument("--mask-column", default=None,
                   help="manifest column holding ROI masks (default: 'mask' if present)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--cache-dir", default=None,
                   help="feature cache (default ~/.cache/harmonize/radiomics)")
    p.add_argument("--ray-address", default=None,
                   help="run extraction on a Ray cluster ('local' starts one here)")
    p.set_defaults(func=_shift_report)

    p = sub.add_parser(
        "evaluate", formatter_class=fmt, parents=[common],
        help="downstream benchmark: raw vs augmentation vs harmonized, with CIs + audit",
        epilog="example:\n  harmonize evaluate --config configs/eval/synth_quick.yaml "
               "--out runs/eval")
    p.add_argument("--config", required=True, help="YAML, e.g. configs/eval/synth_quick.yaml")
    p.add_argument("--out", default=None, help="output folder (out)")
    _add_set_option(p, "seeds=[0,1]")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser(
        "study", formatter_class=fmt, parents=[common],
        help="one study, four answers: site shift, central harmonization vs augmentation, "
             "federated vs central, under DP (docs/study.md)",
        epilog="example:\n  harmonize study --config configs/study/femur72_quick.yaml "
               "--out runs/study")
    p.add_argument("--config", required=True, help="YAML, e.g. configs/study/femur72.yaml")
    p.add_argument("--out", default=None, help="output folder (out)")
    _add_set_option(p, "federated.rounds=5")
    p.set_defaults(func=_study)

    p = sub.add_parser(
        "federated", formatter_class=fmt, parents=[common],
        help="federated training with Flower (simulation of the manifest's nodes)",
        epilog="example:\n  harmonize federated --config configs/federated/classifier-quick.yaml "
               "--data data/synth/manifest.csv --out runs/fed")
    p.add_argument("--config", required=True, help="YAML, e.g. configs/federated/"
                   "cyclegan-quick.yaml")
    p.add_argument("--data", default=None, help="manifest CSV (node column, default: site)")
    p.add_argument("--reference-site", default=None, help="translators: the target site")
    p.add_argument("--out", required=True, help="output folder: model/, rounds.csv, ...")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--resume", action="store_true",
                   help="continue a killed run from its last saved round (OUT/server_state)")
    _add_set_option(p, "rounds=20")
    p.set_defaults(func=_federated)

    p = sub.add_parser("demo", formatter_class=fmt, parents=[common],
                       help="the whole pipeline on synthetic data",
                       epilog="example:\n  harmonize demo --out demo_out")
    p.add_argument("--out", default="demo_out",
                   help="output folder; open OUT/report.html (default demo_out)")
    p.add_argument("--quick", action="store_true",
                   help="a few minutes: classical translators, one CNN, one seed")
    _add_synth_options(p, per_site=80, size=128)
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from harmonize.training.process_exit import end_process

    # under torchrun a process leaves with os._exit, skipping Python's finalization (see there)
    return end_process(_run(argv))


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("HARMONIZE_DEBUG", "") not in ("", "0")
    # idle OpenMP threads spin by default; on a shared 2-core machine that made a training
    # step ~80x slower while another job ran. Set for this command only (torch is imported
    # by the subcommands, after this), never when the library is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("harmonize: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as err:
        if debug:
            raise
        # the library's errors name the file and the fix; print them on one line
        print(f"harmonize: error: {' '.join(str(err).split())}", file=sys.stderr)
        print("(harmonize --debug ..., or HARMONIZE_DEBUG=1, shows where it happened)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
