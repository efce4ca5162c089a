r"""Plots and tables from training workdirs.

  python -m diffvit_jax.reporting.report RUN_DIR... --out reports
  ./launch.sh report                      # every run under runs/
"""

import os
import sys

if __name__ == "__main__":  # Before JAX is imported: a report never starts a GPU backend,
  os.environ["JAX_PLATFORMS"] = "cpu"  # whatever the caller's environment says.

from absl import flags  # noqa: E402

from diffvit_jax.errors import DataError, UserError  # noqa: E402
from diffvit_jax.models import registry  # noqa: E402
from diffvit_jax.reporting import levels, plots, secondary, tables, verdict  # noqa: E402
from diffvit_jax.reporting import manifest as manifest_lib  # noqa: E402
from diffvit_jax.reporting import runs as runs_lib  # noqa: E402


def _image(path: str, out_dir: str, alt: str) -> str:
  return f"![{alt}]({os.path.relpath(path, out_dir)})"


def _curve_figures(groups, out_dir) -> list[tuple[str, str]]:
  """(title, png path) of every learning-curve figure."""
  figures = []
  protocols = sorted({g.protocol for g in groups})
  for protocol in protocols:
    mine = [g for g in groups if g.protocol == protocol]
    tag = protocol or "none"
    for size in dict.fromkeys(g.size for g in mine):
      at_size = [g for g in mine if g.size == size]
      png, _ = plots.save(plots.size_comparison(at_size, protocol, size),
                          os.path.join(out_dir, f"curves_{tag}_{size.replace(' ', '_')}"))
      figures.append((f"{size}, protocol {protocol}", png))
    for arch in dict.fromkeys(g.arch for g in mine):
      of_arch = [g for g in mine if g.arch == arch]
      if len(of_arch) > 1:  # With one size this figure would repeat a line of the one above.
        png, _ = plots.save(plots.arch_across_sizes(of_arch, protocol, arch),
                            os.path.join(out_dir, f"curves_{tag}_{arch}"))
        figures.append((f"{registry.label(arch)} across sizes, "
                        f"protocol {protocol}", png))
  return figures


def _lambda_figures(groups, out_dir) -> list[tuple[str, str]]:
  figures = []
  for protocol in sorted({g.protocol for g in groups}):
    differential = [g for g in groups if g.protocol == protocol and g.runs[0].lambda_tags()]
    if differential:
      png, _ = plots.save(plots.lambda_per_layer(differential, protocol),
                          os.path.join(out_dir, f"lambda_{protocol or 'none'}"))
      figures.append((f"lambda, protocol {protocol}", png))
  return figures


def _robustness_figures(groups, out_dir) -> list[tuple[str, str]]:
  figures = []
  with_results = [g for g in groups if all(r.robustness for r in g.runs)]
  for key in dict.fromkeys((g.protocol, g.size) for g in with_results):
    at_size = [g for g in with_results if (g.protocol, g.size) == key]
    title = f"Corrupted validation set, {key[1]} models, protocol {key[0]}"
    stem = f"robustness_{key[0] or 'none'}_{key[1].replace(' ', '_')}"
    png, _ = plots.save(plots.mean_accuracy_vs_severity(at_size, title),
                        os.path.join(out_dir, stem))
    figures.append((title, png))
    for group in at_size:
      result = _mean_robustness([r.robustness for r in group.runs])
      seeds = len(group.runs)
      title = (f"{group.label} {group.size}, protocol {group.protocol}: top-1 under corruption"
               f"{f' (mean of {seeds} seeds)' if seeds > 1 else ''}")
      png, _ = plots.save(plots.accuracy_vs_severity(result, title),
                          os.path.join(out_dir, f"{stem}_{group.arch}"))
      figures.append((title, png))
  return figures


def _mean_robustness(results: list[dict]) -> dict:
  """The cells (and clean accuracy) of several seeds' robustness.json, averaged."""
  mean = lambda values: float(sum(values) / len(values))
  corrupted = {}
  for name, by_severity in results[0]["corrupted"].items():
    for severity in by_severity:
      values = [r["corrupted"][name][severity]["top1"] for r in results
                if severity in r["corrupted"].get(name, {})]
      corrupted.setdefault(name, {})[severity] = {"top1": mean(values)}
  return {"clean": {"top1": mean([r["clean"]["top1"] for r in results])},
          "corrupted": corrupted}


def plan(workdirs: list[str], margin: float | None = None,
         manifest_path: str = "") -> tables.Plan:
  """The verdict's design: the study manifest's (given, or the one study.json two levels
  above every workdir), with a margin given here marked post hoc unless it is the
  manifest's; without a manifest, the family is the comparisons the runs hold."""
  path = manifest_path or manifest_lib.find(workdirs)
  design = manifest_lib.read(path) if path else None
  if design is None:
    return tables.Plan(margin=verdict.DEFAULT_EQUIVALENCE_MARGIN if margin is None else margin,
                       margin_source="default" if margin is None else "post hoc")
  if margin is None or abs(margin - design.margin) < 1e-12:
    return tables.Plan(margin=design.margin, alpha=design.alpha, margin_source="manifest",
                       design=design)
  return tables.Plan(margin=margin, alpha=design.alpha, margin_source="post hoc",
                     design=design)


def _design_text(plan_: tables.Plan, rows: list[dict]) -> str:
  """Where the family, margin and seeds come from, and what counts in Holm as p = 1."""
  design = plan_.design
  if design is None:
    family = ("No study manifest (study.json) was found for these runs, so the family is "
              "the comparisons of the sizes given, not a planned one, and every paired seed "
              "counts.")
  else:
    family = (f"Design from the study manifest `{design.path}` (written {design.date}, before "
              f"the first run): primary endpoint {design.endpoint}, alpha {design.alpha:g}, "
              f"planned seeds {' '.join(map(str, design.seeds))}, family of "
              f"{len(design.family)} comparison(s): "
              + ", ".join(f"{p.model} vs {p.baseline}" for p in design.family)
              + ". The verdict uses the planned seeds only; a seed beyond them gives an "
              "exploratory reading below, never the verdict.")
  margin = f"±{100 * plan_.margin:.2f} pp"
  margin += {"manifest": " (fixed in the study manifest before the runs)",
             "default": " (the code's default; no manifest fixed one)",
             "post hoc": (" **post hoc**: given at report time (`--equivalence_margin`), not "
                          "fixed before the runs; the planned one was "
                          f"±{100 * design.margin:.2f} pp" if design else
                          " **post hoc**: given at report time (`--equivalence_margin`), not "
                          "fixed before the runs")}[plan_.margin_source]
  as_one = [f"{r['size']} ({r['incomplete'] or r['reading'].split(';')[0]})" for r in rows
            if r.get("role") == "primary" and r.get("holm_as_1") is True]
  counted = ("\n\nCounted in Holm at p = 1 (planned, but no admissible comparison, fewer "
             f"than {verdict.MIN_SEEDS} pairs, or incomplete): " + "; ".join(as_one) + "."
             if as_one else "")
  return f"{family} Equivalence margin {margin}.{counted}\n"


def _verdict_intro(alpha: float) -> str:
  return (
      "The primary endpoint is the final validation top-1, the differential model minus the "
      "ViT paired by seed; its two-sided paired t-tests over the sizes of a protocol (the "
      "levels, in a study over levels such as the clutter study) form one family, adjusted by "
      "Holm's method (a reading of better or worse needs Holm p < "
      f"{alpha:g}); the validation loss and every other number are secondary and "
      "descriptive.\n\n"
      "Differences in percentage points of top-1. 'Equivalent' when both one-sided tests of "
      f"TOST reject at {alpha:g}; TOST p is per comparison, not adjusted across sizes (each "
      "size's equivalence is its own claim). SD of differences: the sample SD of the "
      f"per-seed differences; MDE: the difference the paired t-test detects with "
      f"{100 * verdict.POWER:.0f}% power at {alpha:g} two-sided with these seeds; seeds for "
      "the margin: the paired seeds needed to detect the margin so, both from the noncentral "
      "t at the observed SD, with the range the SD's 95% chi-square interval allows (an SD "
      "from few seeds is itself uncertain). 95% CI (seeds × images): the interval of the mean "
      "per-image difference of top-1 correctness with seeds crossed with the shared "
      "validation images (two-way random effects, Satterthwaite df), so the noise of a finite "
      f"validation set counts too. With fewer than {verdict.MIN_SEEDS} paired seeds no "
      "difference is given; with no spread across seeds there is no t-interval and no "
      "reading; a comparison that lost a planned seed (a run left out below, or one without "
      "its pair) reads 'incomplete'.\n")


def _left_out_markdown(excluded) -> str:
  rows = [[f"`{e.run.workdir}`", registry.label(e.run.arch), str(e.run.seed), e.reason]
          for e in sorted(excluded, key=lambda e: e.run.workdir)]
  return tables.markdown_table(["workdir", "arch", "seed", "why it is left out"], rows)


def write_report(workdirs: list[str], out_dir: str, *, margin: float | None = None,
                 manifest_path: str = "") -> dict[str, str]:
  """Writes every table and figure for `workdirs` into `out_dir`; returns name -> path.

  Only the runs `runs.admit` admits enter the tables and figures; the others
  are listed with the reason. The design (family, margin, planned seeds) is
  the study manifest's (`manifest_path`, else found beside the runs, see
  `plan`); `margin` (top-1 fraction) given here is marked post hoc.

  Reads each run's TensorBoard events (written by CLU), run_info.json and,
  when `--mode eval_corrupted` was run, robustness.json; groups the seeds of each
  config (see `reporting.runs`: only finished runs of matching configs count; the
  report lists the others and why) and writes into --out:

    report.md                    the tables below and the figures, in one page, opening
                                 with the verdict
    verdict.csv                  per planned comparison, parameter-matched differential minus
                                 classic: the primary endpoint (final top-1 over the planned
                                 seeds: paired t, Holm over the family, TOST against the margin,
                                 MDE and seeds needed with their range, the seeds x images
                                 interval, per-seed values, reading), the secondary, descriptive
                                 val loss, and exploratory rows (seeds beyond the plan, or
                                 comparisons outside the family)
    per_seed.csv                 per paired seed: both top-1s, discordant images, McNemar's p
    secondary.csv                pooled effect over sizes, its trend, P(better), pairing
    compute.csv                  per pair: FLOPs, throughput, wall time, top-1 at the other's
                                 wall time and FLOPs
    results.{md,csv}             per config: params, training GFLOPs/image, seeds, final
                                 top-1/top-5/val loss (the headline), best-on-val top-1 with the
                                 top-5 of that evaluation, throughput, wall time
    differences.{md,csv}         parameter-matched pairs (within 0.5%): more metrics, same CI
    unmatched.csv                pairs that are not matched (DiffViT-v2): accuracy beside
                                 parameters and training GFLOPs
    runs.csv                     the same numbers per run
    curves_<protocol>_<size>.{png,svg}   ViT vs DiffViT at one size
    curves_<protocol>_<arch>.{png,svg}   one architecture across sizes
    lambda_<protocol>.{png,svg}          lambda per layer over training (differential)
    robustness.{md,csv}                  when the runs have robustness.json: clean top-1,
                                         mean corruption error, mCE, top-1 per corruption
    robustness_<protocol>_<size>.{png,svg}         top-1 (mean over corruptions) vs severity
    robustness_<protocol>_<size>_<arch>.{png,svg}  top-1 per corruption vs severity
  """
  if not workdirs:
    raise DataError("No run directories given: pass the --workdir of one or more training "
                    "runs (each holds a run_info.json).")
  if margin is not None and not 0 < margin < 1:
    raise UserError(f"--equivalence_margin={100 * margin:g} pp: expected a margin in "
                    "percentage points of top-1 between 0 and 100, e.g. 1.0.")
  os.makedirs(out_dir, exist_ok=True)
  loaded = [runs_lib.load_run(w) for w in workdirs]
  if not any(r.scalars for r in loaded):
    raise DataError(f"None of {workdirs} has TensorBoard event files: were they written by "
                    "`diffvit_jax.main` (which writes them into the workdir)?")
  admitted, excluded = runs_lib.admit(loaded)
  groups = runs_lib.group_runs(admitted)

  written = {}
  comparisons = tables.comparisons(groups, excluded)
  plan_ = plan(workdirs, margin, manifest_path)
  verdict_rows = tables.verdict_rows(comparisons, plan_)
  pooled_rows = secondary.pooled_rows(comparisons, plan_)
  compute_rows = secondary.compute_rows(comparisons)
  seed_rows = tables.per_seed_rows(comparisons)
  group_rows = tables.group_rows(groups)
  diff_rows = tables.difference_rows(comparisons)
  unmatched_rows = tables.unmatched_rows(comparisons)
  run_rows = tables.run_rows(groups)
  robust_rows = tables.robustness_rows(groups)
  robust_paired = tables.robustness_paired_rows(comparisons)
  tables.write_csv(group_rows, written.setdefault("results.csv", f"{out_dir}/results.csv"))
  tables.write_csv(run_rows, written.setdefault("runs.csv", f"{out_dir}/runs.csv"))
  sections = ["# Results\n"]
  if verdict_rows:
    tables.write_csv(verdict_rows, written.setdefault("verdict.csv", f"{out_dir}/verdict.csv"))
    tables.write_csv(seed_rows, written.setdefault("per_seed.csv", f"{out_dir}/per_seed.csv"))
    tables.write_csv(pooled_rows, written.setdefault("secondary.csv",
                                                     f"{out_dir}/secondary.csv"))
    tables.write_csv(compute_rows, written.setdefault("compute.csv", f"{out_dir}/compute.csv"))
    sections += ["## Verdict: differential minus classic attention, parameter-matched\n",
                 _verdict_intro(plan_.alpha), _design_text(plan_, verdict_rows),
                 tables.verdict_markdown(verdict_rows),
                 "\nPer seed: both models' final top-1 and, where both runs wrote "
                 "per_example.npz, the validation images only one of them got right and "
                 "McNemar's exact p (binomial test of the discordant images, two-sided).\n",
                 tables.per_seed_markdown(seed_rows),
                 "\n### Secondary: pooled over sizes, probability of improvement, pairing\n",
                 "Secondary and descriptive (no test is claimed, no multiplicity control), "
                 "from the planned seeds. Pooled effect: the mean over the sizes of a family of "
                 "their mean paired differences, each size weighted equally; fixed effects, "
                 "because the sizes are the design, not a sample of sizes, and the effect may "
                 "differ between them (the estimate is their average, not a common effect), "
                 "with a Welch-Satterthwaite t-interval. Trend: the least-squares slope of the "
                 "per-size differences against log10(parameters) (against the level in a "
                 "study over levels: the interaction), same interval. P(model > "
                 "ViT): the probability that a run of the model beats a run of the ViT, all "
                 "pairs of runs of a size, averaged over sizes, with a percentile bootstrap "
                 f"interval ({verdict.BOOTSTRAP_RESAMPLES} resamples of each architecture's runs "
                 f"within each size, random seed {verdict.BOOTSTRAP_SEED}; with 3-5 runs a "
                 "coarse interval).\n",
                 secondary.pooled_markdown(pooled_rows),
                 "\n### Secondary: compute beside accuracy\n",
                 "Descriptive. Training PFLOPs: forward + backward matmul FLOPs per image "
                 "(models/stats.py) x batch x steps; throughput and wall time as logged by the "
                 "runs (mean over seeds). Top-1 at the other's wall time / FLOPs: each run's "
                 "validation curve read (linearly between evaluations) at the step where its "
                 "own wall time / FLOPs, taken as proportional to the step, equal the other "
                 "architecture's whole run; '-' where that is beyond the end of any of its "
                 "runs (seeds). A run cut short under a cosine schedule is not one trained "
                 "for that budget.\n",
                 secondary.compute_markdown(compute_rows),
                 *levels.sections(comparisons, plan_, out_dir, written)]
  else:
    sections += ["## Verdict\n",
                 "No verdict: these runs hold no parameter-matched pair of a differential and a "
                 "classic model of the same size and protocol.\n"]
  if excluded:
    sections += ["\n### Runs left out of every table\n",
                 "A run counts only when it finished, its final metrics are finite and it ran "
                 "the config of the runs it is compared with but for the architecture and the "
                 "seed.\n", _left_out_markdown(excluded)]
  sections += ["\n## Results per config\n",
               "Accuracies in %, mean ± std over seeds (std only with several seeds). Final: "
               "the last evaluation, the headline. Best-on-val: the evaluation with the "
               "highest validation top-1, with the top-5 and step of that same evaluation; it "
               "is selected on the validation split, which is also the only labelled held-out "
               "set, so it is optimistic. Train GFLOPs/img: forward + backward matmul FLOPs "
               "per image (models/stats.py). Throughput: median over logging windows; wall "
               "time: all training sessions, evaluation included.\n",
               tables.results_markdown(group_rows)]
  if diff_rows:
    tables.write_csv(diff_rows, written.setdefault("differences.csv",
                                                   f"{out_dir}/differences.csv"))
    diff_md = tables.differences_markdown(diff_rows)
    sections += ["\n## Differential minus classic, parameter-matched pairs\n",
                 f"Only pairs whose parameter counts differ by at most "
                 f"{100 * tables.MATCH_TOLERANCE:.1f}%. Mean over paired seeds of the per-seed "
                 f"difference [{100 * verdict.CONFIDENCE:.0f}% paired t-interval]; top-1/top-5 "
                 "in percentage points.\n",
                 diff_md]
  if unmatched_rows:
    tables.write_csv(unmatched_rows, written.setdefault("unmatched.csv",
                                                        f"{out_dir}/unmatched.csv"))
    sections += ["\n## Not parameter-matched: accuracy beside parameters and compute\n",
                 "These models differ from the ViT of their size in more than the attention "
                 f"(parameters differ by more than {100 * tables.MATCH_TOLERANCE:.1f}%), so a "
                 "difference in accuracy cannot be credited to the attention alone.\n",
                 tables.unmatched_markdown(unmatched_rows)]
  if robust_rows:
    tables.write_csv(robust_rows, written.setdefault("robustness.csv",
                                                     f"{out_dir}/robustness.csv"))
    robust_md = tables.robustness_markdown(robust_rows)
    with open(written.setdefault("robustness.md", f"{out_dir}/robustness.md"), "w") as f:
      f.write(robust_md + "\n")
    sections += ["\n## Robustness (corrupted validation set)\n",
                 "Mean corruption error: mean over corruptions and severities of the top-1 "
                 "error. mCE: mean over corruptions of CE_c = sum_s E_s / sum_s E_s(baseline).\n",
                 robust_md]
  if robust_paired:
    tables.write_csv(robust_paired, written.setdefault("robustness_paired.csv",
                                                       f"{out_dir}/robustness_paired.csv"))
    sections += ["\nPaired by seed (Hendrycks & Dietterich's definitions, over the benchmark's "
                 "corruptions): each differential run against the ViT of its protocol, size and "
                 "seed, both evaluated at their final step on the same images. CE_c = sum_s "
                 "E_{c,s} / sum_s E_{c,s}(ViT), mCE = mean_c CE_c; relative CE_c = sum_s "
                 "(E_{c,s} − E_clean) / sum_s (E_{c,s}(ViT) − E_clean(ViT)), so a difference "
                 "in clean accuracy does not leak into it. The summary row gives the paired "
                 f"{100 * verdict.CONFIDENCE:.0f}% t-interval over seeds of mCE − 100% and of "
                 "the difference in mean corruption error (secondary, descriptive).\n",
                 tables.robustness_paired_markdown(robust_paired)]
  figures = (_curve_figures(groups, out_dir) + _lambda_figures(groups, out_dir)
             + _robustness_figures(groups, out_dir))
  sections.append("\n## Figures\n")
  for title, png in figures:
    for path in (png, png[:-len(".png")] + ".svg"):
      written[os.path.basename(path)] = path
    sections.append(f"### {title}\n\n{_image(png, out_dir, title)}\n")
  sections += ["\n## Runs\n", tables.runs_markdown(run_rows)]

  with open(written.setdefault("results.md", f"{out_dir}/results.md"), "w") as f:
    f.write(tables.results_markdown(group_rows) + "\n")
  if diff_rows:
    with open(written.setdefault("differences.md", f"{out_dir}/differences.md"), "w") as f:
      f.write(diff_md + "\n")
  with open(written.setdefault("report.md", f"{out_dir}/report.md"), "w") as f:
    f.write("\n".join(sections) + "\n")
  return written


USAGE = ("python -m diffvit_jax.reporting.report RUN_DIR... [--out DIR] "
         "[--manifest STUDY_JSON] [--equivalence_margin PP]")


def parse_flags(argv: list[str]) -> tuple[list[str], str, float | None, str]:
  """(run dirs, output dir, equivalence margin as a fraction or None, manifest path).

  A FlagValues of its own, parsed afresh per call: `main` can be called
  several times in one process (tests) without flags kept from an earlier call.
  """
  flag_values = flags.FlagValues()
  flags.DEFINE_string("out", "reports", "Output directory.", flag_values=flag_values)
  flags.DEFINE_float("equivalence_margin", None,
                     "Equivalence margin of the verdict's TOST, in percentage points of top-1; "
                     "default: the study manifest's (else 1.0). Another one is marked post hoc.",
                     flag_values=flag_values)
  flags.DEFINE_string("manifest", "", "The study's study.json (default: the one two levels "
                      "above every run dir, if any).", flag_values=flag_values)
  flags.DEFINE_bool("help", False, "Show this help.", flag_values=flag_values)
  try:
    positional = flag_values([USAGE.split()[2], *argv])[1:]
  except flags.Error as e:
    raise UserError(f"{e}. Usage: {USAGE}") from e
  if flag_values.help:
    print(f"Usage: {USAGE}\n\nPlots (PNG, SVG) and tables (Markdown, CSV) from training "
          f"workdirs.\n\n{flag_values.main_module_help() or flag_values}")
    raise SystemExit(0)
  margin = flag_values.equivalence_margin
  return (positional, flag_values.out, None if margin is None else margin / 100,
          flag_values.manifest)


def main(argv=None) -> int:
  try:
    workdirs, out, margin, manifest_path = parse_flags(
        sys.argv[1:] if argv is None else list(argv))
    written = write_report(workdirs, out, margin=margin, manifest_path=manifest_path)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return e.exit_code
  print(f"Wrote {len(written)} files to {out}/ (start with "
        f"{os.path.join(out, 'report.md')}).")
  return 0


if __name__ == "__main__":
  sys.exit(main())
