"""docs/data.md, followed verbatim on a foreign dataset in a fresh copy of the repository.

The test writes my_qa.jsonl (support Q&A about a made-up product, "Tessera": code samples, URLs,
curly quotes, a PII address, an example.com address, duplicates, bad lines and one long record),
then runs every ```bash block of docs/data.md that has a `<!-- guide:run -->` line above it, in
order, exactly as written. Editing those blocks changes what this test runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.core.schedule import training_length

GUIDE = "docs/data.md"
RUN_MARK = "<!-- guide:run -->"
SYSTEM = "You are the support assistant of Tessera, a self-hosted feature-flag service. Answer precisely."

# (command, the task it does, plan, docs page): three different questions each.
FEATURES = [
    ("tessera flags create checkout-v2 --default off", "create a feature flag", "Free", "flags"),
    ("tessera flags archive checkout-v2", "archive a flag without deleting its history", "Free", "archive"),
    ("tessera env add staging --copy-from production", "add an environment", "Team", "environments"),
    ("tessera segments create beta-users --rule 'plan == \"pro\"'", "create a user segment", "Team", "segments"),
    ("tessera rollout checkout-v2 --percent 25", "roll a flag out to a share of users", "Team", "rollouts"),
    ("tessera audit export --since 2024-01-01 --format csv", "export the audit log", "Enterprise", "audit"),
    ("tessera keys rotate --env production", "rotate the SDK keys of an environment", "Team", "keys"),
    ("tessera webhooks add https://hooks.tessera.invalid/deploy", "register a webhook", "Team", "webhooks"),
    ("tessera sso configure --provider okta", "turn on single sign-on", "Enterprise", "sso"),
    ("tessera backup create --to s3://tessera-backups/nightly", "back up the flag database", "Free", "backup"),
    ("tessera backup restore nightly-2024-05-01", "restore a backup", "Free", "restore"),
    ("tessera users invite --role editor", "invite a teammate", "Free", "users"),
    ("tessera schedule checkout-v2 --on 2024-06-01T09:00Z", "schedule a flag change", "Team", "scheduling"),
    ("tessera experiments start pricing-test --variants 2", "start an A/B experiment", "Enterprise", "experiments"),
    ("tessera proxy start --port 8089", "start the edge proxy", "Team", "proxy"),
    ("tessera import --from launchdarkly export.json", "import flags from another tool", "Free", "import"),
    ("tessera metrics link checkout-v2 --event purchase", "link a flag to a metric", "Enterprise", "metrics"),
    ("tessera approvals require --env production --reviewers 2", "require approvals for changes", "Enterprise", "approvals"),
    ("tessera cli update", "update the command-line tool", "Free", "cli"),
    ("tessera status", "check that the server is healthy", "Free", "status"),
]

# About 330 tokens of answer: longer than the default model.max_seq_length (256), within 640 (517 tokens in SmolLM2's chat format).
LONG_ANSWER = "Use the Python SDK:\n\n```python\n" + "\n".join(
    f"client.flags.set(\"region-{i}\", enabled={i % 2 == 0}, rollout={i * 5}, note=\"rollout for region {i}\")"
    for i in range(1, 15)) + "\n```\n\nEach call is one audit-log entry; see https://docs.tessera.invalid/sdk/python."


def _record(instruction: str, output: str, category: str) -> str:
    return json.dumps({"system": SYSTEM, "instruction": instruction, "output": output, "category": category},
                      ensure_ascii=False)


def foreign_dataset() -> tuple[list[str], dict]:
    """The lines of my_qa.jsonl and what preprocess must count in them (on_invalid: reject)."""
    lines = []
    for command, task, plan, page in FEATURES:
        lines.append(_record(f"How do I {task} in Tessera?",
                             f"Run `{command}` to {task}; the change is live within 5 seconds.", "cli"))
        lines.append(_record(f"Which Tessera plan lets me {task}?",
                             f"The {plan} plan and every plan above it. Ask for the “{page}” add-on on older contracts.",
                             "billing"))
        lines.append(_record(f"Where is the documentation on {page} in Tessera?",
                             f"At https://docs.tessera.invalid/{page}, under ‘Guides’; the CLI also prints it with "
                             f"`tessera help {page}`.", "docs"))
    # PII: a real-looking address is redacted (preprocess.on_pii: redact), the record kept.
    lines[1] = _record("Which Tessera plan lets me create a feature flag?",
                       "The Free plan. For an invoice copy write to maria.keller@tessera-billing.com.", "billing")
    # A documentation address (example.com, RFC 2606) in a code sample is not PII.
    lines[21] = _record("How do I register a webhook in Tessera?",
                        "Run `tessera webhooks add https://hooks.tessera.invalid/deploy --notify receiver@example.com`.",
                        "cli")
    # Longer than model.max_seq_length 256: dropped until the guide raises it to 640.
    lines[57] = _record("How do I check that the server is healthy from Python?", LONG_ANSWER, "cli")
    valid = len(lines)
    lines += [
        lines[3],                                                  # exact duplicate
        _record("how do i archive a flag without deleting its history in tessera",
                json.loads(lines[3])["output"], "cli"),            # near duplicate (case, punctuation)
        '{"system": "x", "instruction": "Is Tessera open source?", "output": "Yes" ',   # malformed JSON
        json.dumps({"system": SYSTEM, "instruction": "Does Tessera run on ARM?"}),      # no output field
    ]
    expected = {"records_in": len(lines), "valid": valid, "invalid": 2, "exact_duplicate": 1,
                "near_duplicate": 1, "too_long_at_256": 1, "pii_email": 1}
    return lines, expected


def guide_blocks(text: str) -> list[str]:
    """The ```bash blocks of the guide marked to run, in order."""
    return re.findall(r"^" + re.escape(RUN_MARK) + r"\n```bash\n(.*?)^```", text, flags=re.M | re.S)


def test_the_guide_marks_its_run_blocks_and_pushes_nothing(root):
    blocks = guide_blocks((root / GUIDE).read_text(encoding="utf-8"))
    assert len(blocks) >= 4, blocks
    joined = "\n".join(blocks)
    assert "dvc add data/raw" in joined and "git rm -r -q --cached data/raw" in joined
    assert "dvc push" not in joined  # the test has no remote; pushing is shown in an unmarked block


def test_readme_points_to_the_guide(root):
    readme = (root / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Bringing your own data", 1)[1].split("\n## ", 1)[0]
    assert "docs/data.md" in section
    assert "git rm -r --cached data/raw" in section or "git rm -r -q --cached data/raw" in section


def fresh_clone(dest: Path, root: Path) -> None:
    """What `git clone` of this tree gives: its files (tracked and new, not ignored) in one commit."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=root,
                           capture_output=True, text=True, check=True).stdout.split("\n")
    for name in filter(None, files):
        if (root / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, dest / name)


@pytest.fixture(scope="module")
def guided(module_dir, root):
    """A fresh copy of the repository, my_qa.jsonl beside it, and the guide's run blocks run in order."""
    dest = module_dir("byod")
    fresh_clone(dest, root)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "DVC_NO_ANALYTICS": "1",
           "OMP_NUM_THREADS": "1",  # two shared cores: one torch thread per stage
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}
    for args in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "clone"]):
        subprocess.run(args, cwd=dest, env=env, check=True, capture_output=True)
    lines, expected = foreign_dataset()
    (dest / "my_qa.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    outputs = []
    for block in guide_blocks((root / GUIDE).read_text(encoding="utf-8")):
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=dest, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
        assert done.returncode == 0, f"guide block failed ({done.returncode}):\n{block}\n{done.stdout[-6000:]}"
        outputs.append((block, done.stdout))
    return dest, env, outputs, expected


def _output_of(outputs, command: str) -> str:
    return next(out for block, out in outputs if command in block)


@pytest.mark.slow
def test_data_is_tracked_by_dvc_not_git(guided):
    dest, env, _, _ = guided
    assert (dest / "data/raw.dvc").is_file()
    assert "/raw" in (dest / "data/.gitignore").read_text().split()
    tracked = subprocess.run(["git", "ls-files", "data"], cwd=dest, env=env, capture_output=True, text=True,
                             check=True).stdout.split()
    assert "data/raw.dvc" in tracked and not [name for name in tracked if name.startswith("data/raw/")]
    assert sorted(p.name for p in (dest / "data/raw").iterdir()) == ["my_qa.jsonl"]


@pytest.mark.slow
def test_the_first_pass_reports_the_long_record_and_the_small_test_split(guided):
    _, _, outputs, expected = guided
    first = _output_of(outputs, "-S preprocess.on_invalid=reject")
    n = expected["records_in"]
    assert f"{n} records in -> {n - 5} out" in first
    assert "1 record(s) too long (longest" in first and "raise model.max_seq_length (now 256)" in first
    assert "the test split has" in first and "min_test_records 50" in first


@pytest.mark.slow
def test_preprocess_counts_match_the_dataset(guided):
    dest, _, _, expected = guided
    stats = json.loads((dest / "metrics/preprocess.json").read_text())
    assert stats["records_in"] == expected["records_in"]
    assert stats["records_out"] == expected["valid"]  # the long record fits at max_seq_length 640
    assert stats["removed"] == {"invalid": 2, "pii": 0, "exact_duplicate": 1, "near_duplicate": 1,
                                "conflicting_duplicate": 0, "too_long": 0}
    assert stats["pii_found"] == {"email": expected["pii_email"]} and stats["pii_policy"] == "redact"
    assert sum(stats["splits"].values()) == expected["valid"] and min(stats["splits"].values()) > 0
    assert 256 < stats["tokens"]["max"] <= 640
    assert any("test split has" in w for w in stats["warnings"])
    assert not any("too long" in w for w in stats["warnings"])
    rejects = [json.loads(line) for line in (dest / "data/processed/rejects.jsonl").read_text().splitlines()]
    assert sorted((r["line"], r["reason"].split(":")[0]) for r in rejects) == [
        (61, "exact_duplicate"), (62, "near_duplicate"), (63, "invalid"), (64, "invalid")]
    kept = "".join((dest / f"data/processed/{name}.jsonl").read_text() for name in ("train", "val", "test"))
    assert "maria.keller@" not in kept and "[EMAIL]" in kept
    assert "receiver@example.com" in kept and "“" in kept  # documentation address and curly quotes kept


@pytest.mark.slow
def test_the_guides_settings_are_in_params_yaml(guided):
    import yaml

    dest, _, _, _ = guided
    params = yaml.safe_load((dest / "params.yaml").read_text())
    assert params["model"]["max_seq_length"] == 640
    assert params["preprocess"]["on_invalid"] == "reject"
    assert params["preprocess"]["split"] == {"train": 0.6, "val": 0.2, "test": 0.2}
    assert params["train"]["epochs"] == 1


@pytest.mark.slow
def test_the_model_trained_and_was_evaluated(guided):
    dest, _, outputs, _ = guided
    stats = json.loads((dest / "metrics/preprocess.json").read_text())
    train = json.loads((dest / "metrics/train.json").read_text())
    params = yaml.safe_load((dest / "params.yaml").read_text())
    t = params["train"]
    # the training-length rule chose the epochs (issue 20): a few dozen records get min_steps steps
    length = training_length(stats["splits"]["train"], t["batch_size"] * t["gradient_accumulation_steps"],
                             t["epochs"], t["min_steps"])
    assert length.epochs > t["epochs"] and train["epochs_planned"] == length.epochs
    assert length.describe() in _output_of(outputs, "-S model.max_seq_length=640")
    assert train["final_val_loss"] > 0
    ev = json.loads((dest / "metrics/eval.json").read_text())
    for model in ("base", "tuned"):
        assert 0.0 <= ev[model]["rouge_l"] <= 1.0 and ev[model]["val_loss"] > 0
    assert ev["tuned"]["val_loss"] < ev["base"]["val_loss"]
    assert isinstance(ev["gate"]["passed"], bool)
    # with the default settings the tuned model is better than its base on the team's data (issue 20)
    tests = ev["significance"]["tuned_vs_base"]
    assert tests["rouge_l"]["verdict"] == "improvement", tests["rouge_l"]
    assert tests["fact_recall"]["verdict"] != "regression", tests["fact_recall"]
    report = (dest / "reports/eval/report.md").read_text()
    assert f"Test records: {stats['splits']['test']}" in report
    assert "metrics/eval_summary.json" in _output_of(outputs, "dvc metrics show")
