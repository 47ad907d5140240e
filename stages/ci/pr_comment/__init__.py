"""The one pull-request comment: what this change does to the model, before anyone merges it.

    python -m stages.ci.pr_comment --base main --out comment.md

Sections, in order: with --plan, what CI ran per stage (from the remote/run cache, on the runner,
or not started here, and why: `python -m stages.ci.plan`); the quality-gate verdict; the tuned model's evaluation against the base branch's,
paired over test records (metrics/eval.json and metrics/eval_records.json of both revisions, read from
git): change, 95% interval, verdict and seed noise (metrics/noise_floor.json) per metric, and the
smallest difference the test split can detect; a metric is a regression only when it dropped by more
than the gate's tolerance AND the paired test is significant, and nothing is when the test sets differ;
the headline metrics of every DVC metrics file against the base branch (from
`dvc metrics diff <base> --json`; counters of removed records are "more is worse", data sizes and
token counts get no verdict; the full `dvc metrics diff <base> --md` table is folded below it), `dvc params diff <base> --md`, the loss curves and the base-vs-tuned
metrics as charts, a few answers that changed, and the estimated Azure time and cost of the
training run this pull request would trigger on merge.

Charts: GitHub renders Mermaid diagrams in comments but not images from workflow artifacts or
`data:` URIs, so the comment carries the charts as Mermaid `xychart-beta` blocks (they display
inline, for forks too) and writes matplotlib PNGs to --plots-dir, which ci.yml uploads as the
`pr-charts` artifact. With --image-base-url (a place where the PNGs are published) the comment
embeds the PNGs as well.

Every input is optional and read defensively: a missing or malformed file gives a line saying
what is missing, never a traceback, so the comment is posted even when a stage failed.
The first line is a hidden marker by which `stages.ci.github_comment` finds and updates the comment.

One module per section (gate, evaluation, metrics, params, charts, answers, estimate, plan: the
"What CI ran" section from `python -m stages.ci.plan`; proxy: with --proxy, the same change run through the
CPU default on both revisions by `python -m stages.ci.proxy`), common (git, DVC, formatting) and comment
(the order, the size limit, the command line). The names below are re-exported so that callers and
tests import them from `stages.ci.pr_comment` as before.
"""

from __future__ import annotations

from .answers import AnswerChange, _quote, answer_of, answers_section, changed_answers, parse_predictions, score_of
from .charts import (CHART_METRICS, _downsample, charts_section, mermaid_curve, mermaid_metrics, read_curves,
                     render_pngs)
from .comment import Inputs, build_comment, main, make_comment
from .common import (MARKER, MAX_COMMENT_CHARS, _cell, _fmt, _json_text, _load_json, _num, _num_str, _run,
                     _table_rows, changed_files, dvc, git_show, read_at_rev, read_from_dvc_cache, resolve_base)
from .estimate import TRAIN_PATHS, compute_estimate, estimate_section, training_paths
from .evaluation import (NOISE_PATH, PREPROCESS_PATH, RECORDS_PATH, VERDICT_FLAGS, _eval_comparison, _noise,
                         _noise_floor, _params_model, apply_eval_flags, compare_eval, comparison_table, detectable_line,
                         eval_flag, evaluation_section, noise_applies, verdict_lines)
from .gate import gate_section
from .metrics import (DIFF_TARGETS, EVAL_FILES, HEADLINE_EVAL, LOSS_TOLERANCE, LOSS_WORDS, LOWER_IS_BETTER_PREFIXES,
                      LOWER_IS_BETTER_WORDS, NEUTRAL_PREFIXES, NEUTRAL_WORDS, MetricRow, classify,
                      compact_diff_table, is_headline, loss_noise, metric_direction, metric_rows, metrics_section)
from .params import _gate_params, params_section
from .plan import plan_section
from .proxy import build_proxy_section, proxy_comparison, proxy_gate, proxy_section, read_proxy
