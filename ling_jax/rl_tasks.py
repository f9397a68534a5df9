"""RL tasks and rewards: verifiable task families, Evo-CoT reward shaping, GAR and its judges.

Key: G rollouts of one prompt.

Task families (`FAMILIES`), generated locally from a seed:
- `arithmetic`: "23+45=" style sums, differences and products, checked exactly;
- `string`: reverse / upper-case / length of a short word, checked exactly;
- `python`: write a small function; its tests run in `ling_jax/sandbox.py`.
Every task lands in the `train` or `heldout` split by a hash of its prompt, so the splits never
share a prompt whatever the seed (`make_tasks(..., split="heldout")` for evaluation).

Evo-CoT reward (ling2_spec.md section 8) of rollout i of a group:
  R_i = correct_i + R_len_i + format_i, with p(l) = 0.5 - (l - l_min) / (l_max - l_min + 1e-9),
  R_len = alpha * (p(l) if correct else min(p(l), 0)), format = -0.5 if a thinking tag appears
  in instant mode. GAR: the G rollouts play every pair once; a judge says who wins (1, 0 or 0.5
  for a tie) and each rollout's reward is its tally of wins.
"""

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import Protocol

import numpy as np

from ling_jax import config as config_lib
from ling_jax import sandbox
from ling_jax import tokenizer as tokenizer_lib

FAMILIES = ("arithmetic", "string", "python")
SPLITS = ("train", "heldout")
THINK_TAGS = ("<think>", "</think>")
_WORDS = ("apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "maple", "ocean",
          "zebra", "candle", "forest", "rocket", "silver", "garden", "mirror", "pepper", "violet")


@dataclasses.dataclass(frozen=True)
class Task:
  """One verifiable prompt."""
  family: str  # One of FAMILIES.
  prompt: str  # The user message.
  answer: str  # The exact answer (arithmetic, string) or a reference solution (python).
  tests: str = ""  # Python tasks: assert statements the solution must pass.


def split_of(prompt: str, heldout_fraction: float) -> str:
  """Returns "heldout" or "train" for a prompt, from a hash of its text (stable everywhere)."""
  score = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") / 2**64
  return "heldout" if score < heldout_fraction else "train"


def _arithmetic(rng: np.random.Generator, max_operand: int, ops: str) -> Task:
  a, b = (int(x) for x in rng.integers(0, max_operand + 1, size=2))
  op = ops[int(rng.integers(len(ops)))]
  if op == "-" and b > a:
    a, b = b, a
  value = {"+": a + b, "-": a - b, "*": a * b}[op]
  return Task("arithmetic", f"{a}{op}{b}=", str(value))


def _string(rng: np.random.Generator) -> Task:
  word = _WORDS[int(rng.integers(len(_WORDS)))]
  word = word[:int(rng.integers(3, len(word) + 1))]
  kind = ("reverse", "upper", "length")[int(rng.integers(3))]
  answer = {"reverse": word[::-1], "upper": word.upper(), "length": str(len(word))}[kind]
  return Task("string", f"{kind}: {word}", answer)


def _python(rng: np.random.Generator) -> Task:
  k = int(rng.integers(2, 10))
  kind = ("add", "mul", "rev", "count")[int(rng.integers(4))]
  if kind == "add":
    prompt, body, cases = f"Write f(x) returning x plus {k}.", f"x + {k}", [(3,), (-k,), (10,)]
    fn = lambda x: x + k  # noqa: E731
  elif kind == "mul":
    prompt, body, cases = f"Write f(x) returning x times {k}.", f"x * {k}", [(3,), (0,), (-2,)]
    fn = lambda x: x * k  # noqa: E731
  elif kind == "rev":
    prompt, body, cases = "Write f(s) returning s reversed.", "s[::-1]", [("abc",), ("",), ("xy",)]
    fn = lambda s: s[::-1]  # noqa: E731
  else:
    letter = "aeiou"[k % 5]
    prompt = f"Write f(s) returning how many times {letter!r} occurs in s."
    body, cases = f"s.count({letter!r})", [("banana",), ("",), (letter * k,)]
    fn = lambda s: s.count(letter)  # noqa: E731
  arg = "s" if kind in ("rev", "count") else "x"
  tests = "\n".join(f"assert f({c[0]!r}) == {fn(*c)!r}" for c in cases)
  return Task("python", prompt, f"def f({arg}):\n  return {body}", tests)


def make_tasks(family: str, split: str, count: int, seed: int, *, heldout_fraction: float = 0.2,
               max_operand: int = 20, ops: str = "+") -> list[Task]:
  """Returns `count` tasks of `family` in `split`, drawn from `seed` (repeats allowed)."""
  if family not in FAMILIES:
    config_lib.fail("rl.task_family", f"unknown family {family!r}", f"use one of {FAMILIES}")
  if split not in SPLITS:
    config_lib.fail("rl.split", f"unknown split {split!r}", f"use one of {SPLITS}")
  if not 0 < heldout_fraction < 1:
    config_lib.fail("rl.heldout_fraction", f"must be in (0, 1), got {heldout_fraction}",
                    "hold out e.g. 0.2 of the prompts")
  if family == "arithmetic" and (not ops or set(ops) - set("+-*")):
    config_lib.fail("rl.ops", f"{ops!r} must be a non-empty string of + - *", "use e.g. '+-'")
  rng = np.random.default_rng(seed)
  tasks: list[Task] = []
  for _ in range(count * 200):
    task = {"arithmetic": lambda: _arithmetic(rng, max_operand, ops),
            "string": lambda: _string(rng), "python": lambda: _python(rng)}[family]()
    if split_of(task.prompt, heldout_fraction) == split:
      tasks.append(task)
      if len(tasks) == count:
        return tasks
  config_lib.fail("rl.max_operand", f"could not draw {count} {split} {family} tasks",
                  "raise max_operand (more distinct prompts) or heldout_fraction")
  return tasks


def strip_thinking(text: str) -> str:
  """Returns `text` without <think>...</think> blocks (and stray tags)."""
  text = re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL)
  return text.replace(THINK_TAGS[0], "").replace(THINK_TAGS[1], "")


def extract_code(text: str) -> str:
  """Returns the first ```python fenced block of `text`, else the whole text."""
  match = re.search(r"```(?:python)?\n(.*?)```", text, flags=re.DOTALL)
  return match.group(1) if match else text


def is_correct(task: Task, response: str, limits: sandbox.Limits = sandbox.DEFAULT_LIMITS) -> bool:
  """Returns whether `response` (decoded, stop sequence removed) solves `task`."""
  answer = strip_thinking(response).strip()
  if task.family in ("arithmetic", "string"):
    return answer == task.answer
  return sandbox.run_tests(extract_code(answer), task.tests, limits).passed


def length_rewards(lengths_G: np.ndarray, correct_G: np.ndarray, alpha: float) -> np.ndarray:
  """Returns the Evo-CoT length term of each rollout of one group (ling2_spec.md section 8)."""
  lengths_G = np.asarray(lengths_G, np.float64)
  p_G = 0.5 - (lengths_G - lengths_G.min()) / (lengths_G.max() - lengths_G.min() + 1e-9)
  return alpha * np.where(np.asarray(correct_G, bool), p_G, np.minimum(p_G, 0.0))


def format_penalties(responses: Sequence[str], mode: str, penalty: float = -0.5) -> np.ndarray:
  """Returns `penalty` for each response with a thinking tag in instant mode, else 0."""
  if mode != "instant":
    return np.zeros(len(responses))
  return np.array([penalty if any(t in r for t in THINK_TAGS) else 0.0 for r in responses])


def evo_cot_rewards(task: Task, responses: Sequence[str], lengths_G: np.ndarray, *,
                    alpha: float, mode: str = "instant",
                    limits: sandbox.Limits = sandbox.DEFAULT_LIMITS) -> dict[str, np.ndarray]:
  """Returns the rewards of one prompt's G responses and their parts (correct, length, format)."""
  correct_G = np.array([is_correct(task, r, limits) for r in responses], np.float64)
  length_G = length_rewards(lengths_G, correct_G, alpha)
  format_G = format_penalties(responses, mode)
  return {"reward": correct_G + length_G + format_G, "correct": correct_G,
          "length_reward": length_G, "format_penalty": format_G}


class Judge(Protocol):
  """Says which of two responses to a prompt is better: 1.0 (a), 0.0 (b) or 0.5 (tie)."""

  def compare(self, prompt: str, a: str, b: str) -> float: ...


def gar_tallies(judge: Judge, prompt: str, responses: Sequence[str]) -> np.ndarray:
  """Returns each response's wins in a round robin of all G * (G - 1) / 2 pairs (ties 0.5)."""
  tally_G = np.zeros(len(responses))
  for i in range(len(responses)):
    for j in range(i + 1, len(responses)):
      score = float(judge.compare(prompt, responses[i], responses[j]))
      if not 0.0 <= score <= 1.0:
        raise ValueError(f"judge returned {score} for a pair; a judge must return a value in "
                         "[0, 1] (1 = first wins, 0.5 = tie)")
      tally_G[i] += score
      tally_G[j] += 1.0 - score
  return tally_G


@dataclasses.dataclass
class RuleJudge:
  """A rubric judge for tests: more rubric keywords wins; then the shorter (if `prefer_short`)."""
  keywords: tuple[str, ...] = ()
  prefer_short: bool = True

  def score(self, text: str) -> tuple[int, int]:
    hits = sum(k.lower() in text.lower() for k in self.keywords)
    return hits, (-len(text) if self.prefer_short else 0)

  def compare(self, prompt: str, a: str, b: str) -> float:
    del prompt
    sa, sb = self.score(a), self.score(b)
    return 1.0 if sa > sb else 0.0 if sa < sb else 0.5


class ModelJudge:
  """A generative judge: a language model (a checkpoint) asked which of two replies is better.

  The judge reads `rubric`, the prompt and the replies labelled A and B, then the question; its
  verdict is the probability of "A" against "B" as the next token. Both orders are asked and
  averaged, which cancels the judge's preference for a position.
  """

  def __init__(self, m: Any, variables: dict, tokenizer: Any,
               rubric: str = "Which reply is more helpful, correct and concise?"):
    self.m, self.variables, self.tokenizer, self.rubric = m, variables, tokenizer, rubric
    self._a, self._b = (int(tokenizer.encode(x)[0]) for x in ("A", "B"))

  def _prob_first(self, prompt: str, a: str, b: str) -> float:
    from ling_jax import hf  # pylint: disable=g-import-not-at-top  (hf imports the trainer)

    question = (f"{self.rubric}\nPrompt: {prompt}\nReply A: {a}\nReply B: {b}\n"
                "Answer with A or B.")
    text = tokenizer_lib.render_chat([{"role": "user", "content": question}])
    ids = [self.tokenizer.bos_id, *self.tokenizer.encode(text).tolist()]
    logits_1LV = hf.compute_logits(self.m, self.variables, np.asarray([ids], np.int32),
                                   [len(ids)])
    last_V = np.asarray(logits_1LV[0, len(ids) - 1], np.float64)
    pair = last_V[[self._a, self._b]]
    pair = np.exp(pair - pair.max())
    return float(pair[0] / pair.sum())

  def compare(self, prompt: str, a: str, b: str) -> float:
    return 0.5 * (self._prob_first(prompt, a, b) + 1.0 - self._prob_first(prompt, b, a))


def load_model_judge(workdir: str, rubric: str | None = None) -> ModelJudge:
  """Returns a ModelJudge over the newest checkpoint of a run directory (or an HF directory)."""
  from ling_jax import hf  # pylint: disable=g-import-not-at-top  (hf imports the trainer)

  m, variables = hf.load_pretrained(workdir)
  kwargs = {} if rubric is None else {"rubric": rubric}
  return ModelJudge(m, variables, tokenizer_lib.ByteTokenizer(), **kwargs)


JUDGES: dict[str, Callable[..., Judge]] = {"rule": RuleJudge, "model": load_model_judge}


def write_sft_records(path: str, tasks: Sequence[Task], mode: str = "instant") -> int:
  """Writes `tasks` with their answers as DFT chat records (ling_jax/sft.py); returns the count."""
  with open(path, "w") as f:
    for task in tasks:
      record = {"messages": [{"role": "user", "content": task.prompt},
                             {"role": "assistant", "content": task.answer}], "mode": mode}
      f.write(json.dumps(record) + "\n")
  return len(tasks)
