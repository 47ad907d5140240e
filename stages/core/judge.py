"""Optional LLM-as-judge: the reference template's "response quality 1-5", asked of any
OpenAI-compatible chat-completions endpoint or an Azure OpenAI deployment. Off by default
(params.yaml evaluate.judge.enabled); when off, nothing is sent and the report says so.

Environment (secrets and endpoints stay out of params.yaml):
    EVAL_JUDGE_ENDPOINT   base URL of an OpenAI-compatible API; POST {endpoint}/chat/completions
    EVAL_JUDGE_API_KEY    sent as "Authorization: Bearer ..." (optional for local servers)
    EVAL_JUDGE_MODEL      model name
or, for Azure OpenAI:
    AZURE_OPENAI_ENDPOINT, AZURE_OPENAI_API_KEY, AZURE_OPENAI_DEPLOYMENT,
    AZURE_OPENAI_API_VERSION (default 2024-06-01)
    POST {endpoint}/openai/deployments/{deployment}/chat/completions?api-version=...

Uses only the standard library (urllib), so it adds no dependency.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit

from .params import ConfigError

SYSTEM_PROMPT = (
    "You grade answers of a corporate assistant. Compare the ANSWER with the REFERENCE answer to the "
    "QUESTION. Score 1-5: 5 = correct and complete (all facts such as codes, numbers, names and "
    "durations match), 4 = correct with minor omissions, 3 = partly correct, 2 = mostly wrong, "
    "1 = wrong, off-topic or empty. Reply with JSON only: {\"score\": <1-5>, \"reason\": \"<short>\"}."
)
DEFAULT_AZURE_API_VERSION = "2024-06-01"


@dataclass(frozen=True)
class JudgeConfig:
    url: str
    headers: dict
    model: str | None
    label: str          # for the report: kind, model and host, never the key


def config_from_env(env=None) -> JudgeConfig:
    env = os.environ if env is None else env
    if env.get("EVAL_JUDGE_ENDPOINT"):
        if not env.get("EVAL_JUDGE_MODEL"):
            raise ConfigError("evaluate.judge is enabled: EVAL_JUDGE_ENDPOINT is set but EVAL_JUDGE_MODEL is not")
        base = env["EVAL_JUDGE_ENDPOINT"].rstrip("/")
        headers = {"Content-Type": "application/json"}
        if env.get("EVAL_JUDGE_API_KEY"):
            headers["Authorization"] = f"Bearer {env['EVAL_JUDGE_API_KEY']}"
        return JudgeConfig(f"{base}/chat/completions", headers, env["EVAL_JUDGE_MODEL"],
                           f"{env['EVAL_JUDGE_MODEL']} at {urlsplit(base).netloc}")
    if env.get("AZURE_OPENAI_ENDPOINT"):
        missing = [k for k in ("AZURE_OPENAI_API_KEY", "AZURE_OPENAI_DEPLOYMENT") if not env.get(k)]
        if missing:
            raise ConfigError(f"evaluate.judge is enabled: AZURE_OPENAI_ENDPOINT is set but {', '.join(missing)} "
                              "is not")
        base = env["AZURE_OPENAI_ENDPOINT"].rstrip("/")
        version = env.get("AZURE_OPENAI_API_VERSION", DEFAULT_AZURE_API_VERSION)
        deployment = env["AZURE_OPENAI_DEPLOYMENT"]
        return JudgeConfig(f"{base}/openai/deployments/{deployment}/chat/completions?api-version={version}",
                           {"Content-Type": "application/json", "api-key": env["AZURE_OPENAI_API_KEY"]}, None,
                           f"Azure OpenAI deployment {deployment} at {urlsplit(base).netloc}")
    raise ConfigError("evaluate.judge.enabled is true but no judge endpoint is configured: set EVAL_JUDGE_ENDPOINT "
                      "and EVAL_JUDGE_MODEL (OpenAI-compatible) or AZURE_OPENAI_ENDPOINT, AZURE_OPENAI_API_KEY and "
                      "AZURE_OPENAI_DEPLOYMENT (Azure OpenAI)")


def parse_score(text: str) -> int | None:
    """The 1-5 score from the judge's reply (JSON preferred, else the first digit 1-5)."""
    try:
        data = json.loads(text.strip().removeprefix("```json").removeprefix("```").removesuffix("```"))
        score = int(data["score"])
        return score if 1 <= score <= 5 else None
    except (ValueError, KeyError, TypeError):
        match = re.search(r"\b([1-5])\b", text)
        return int(match.group(1)) if match else None


class Judge:
    def __init__(self, config: JudgeConfig, timeout_s: float = 30.0):
        self.config = config
        self.timeout_s = timeout_s
        self.failures: list[str] = []

    def score(self, question: str, reference: str, answer: str) -> int | None:
        """One 1-5 grade, or None (reason kept in self.failures) when the call or the reply fails."""
        body = {"messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"QUESTION: {question}\nREFERENCE: {reference}\nANSWER: {answer or '(empty)'}"},
        ], "temperature": 0, "max_tokens": 100}
        if self.config.model:
            body["model"] = self.config.model
        request = urllib.request.Request(self.config.url, data=json.dumps(body).encode(), method="POST",
                                         headers=self.config.headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                reply = json.loads(response.read().decode("utf-8"))
            content = reply["choices"][0]["message"]["content"]
        except urllib.error.HTTPError as exc:
            self.failures.append(f"HTTP {exc.code} from the judge endpoint")
            return None
        except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            self.failures.append(f"judge call failed: {exc}")
            return None
        score = parse_score(content or "")
        if score is None:
            self.failures.append(f"judge reply has no 1-5 score: {content[:80]!r}")
        return score

    def score_many(self, items: list[tuple[str, str, str]]) -> list[int | None]:
        return [self.score(q, r, a) for q, r, a in items]
