"""Tests for ling_jax/rl_tasks.py: Evo-CoT length term and format penalty against hand-worked
values, GAR tallies, task families, held-out splits and answer checking.

Key: G rollouts of one prompt.
"""

import json

import numpy as np
import pytest

from ling_jax import config as config_lib
from ling_jax import rl_tasks
from ling_jax import sft


def test_length_rewards_hand_computed():
  # l_min 10, l_max 30: p = 0.5, 0, -0.5; the wrong one keeps only the negative part.
  np.testing.assert_allclose(rl_tasks.length_rewards([10, 20, 30], [1, 1, 0], alpha=1.0),
                             [0.5, 0.0, -0.5], atol=1e-8)
  # A short wrong answer earns no length bonus (min(p, 0) = 0); a long right one is penalised.
  np.testing.assert_allclose(rl_tasks.length_rewards([10, 30], [0, 1], alpha=0.2),
                             [0.0, -0.1], atol=1e-8)
  # Equal lengths: p = 0.5 for all (the 1e-9 keeps the division finite).
  np.testing.assert_allclose(rl_tasks.length_rewards([7, 7, 7], [1, 0, 1], alpha=0.4),
                             [0.2, 0.0, 0.2], atol=1e-8)


def test_evo_cot_reward_sums_its_parts():
  task = rl_tasks.Task("arithmetic", "2+3=", "5")
  responses = ["5", "<think>2+3</think>5", "6"]
  parts = rl_tasks.evo_cot_rewards(task, responses, np.array([1, 17, 1]), alpha=0.1)
  np.testing.assert_array_equal(parts["correct"], [1, 1, 0])  # Thinking stripped for checking.
  np.testing.assert_array_equal(parts["format_penalty"], [0, -0.5, 0])
  np.testing.assert_allclose(parts["length_reward"], [0.05, -0.05, 0.0], atol=1e-9)
  np.testing.assert_allclose(parts["reward"], [1.05, 0.45, 0.0], atol=1e-9)
  deep = rl_tasks.format_penalties(responses, mode="deep")
  np.testing.assert_array_equal(deep, [0, 0, 0])


class _TableJudge:
  """Judges by a fixed strength per response; ties at equal strength."""

  def __init__(self, strength):
    self.strength = strength

  def compare(self, prompt, a, b):
    sa, sb = self.strength[a], self.strength[b]
    return 1.0 if sa > sb else 0.0 if sa < sb else 0.5


def test_gar_tallies_hand_computed():
  # Strengths 3, 1, 1, 0: "a" beats all three; "b" and "c" tie each other and beat "d".
  judge = _TableJudge({"a": 3, "b": 1, "c": 1, "d": 0})
  tally_G = rl_tasks.gar_tallies(judge, "p", ["a", "b", "c", "d"])
  np.testing.assert_array_equal(tally_G, [3.0, 1.5, 1.5, 0.0])
  assert tally_G.sum() == 4 * 3 / 2  # Every pair hands out exactly one point.


def test_rule_judge_rubric_then_length():
  judge = rl_tasks.RuleJudge(keywords=("because", "example"))
  tally_G = rl_tasks.gar_tallies(judge, "why?", ["yes", "because of x", "because, for example",
                                                 "because of it, e.g."])
  # Two keywords beat one; among one-keyword replies the shorter wins.
  np.testing.assert_array_equal(tally_G, [0.0, 2.0, 3.0, 1.0])

  class Broken:
    def compare(self, prompt, a, b):
      return 2.0

  with pytest.raises(ValueError, match="must return a value in"):
    rl_tasks.gar_tallies(Broken(), "p", ["x", "y"])


def test_splits_are_disjoint_and_stable():
  train = rl_tasks.make_tasks("arithmetic", "train", 300, seed=0, max_operand=30)
  held = rl_tasks.make_tasks("arithmetic", "heldout", 100, seed=1, max_operand=30)
  assert not {t.prompt for t in train} & {t.prompt for t in held}
  assert all(rl_tasks.split_of(t.prompt, 0.2) == "heldout" for t in held)
  assert rl_tasks.make_tasks("string", "train", 5, seed=3) == rl_tasks.make_tasks(
      "string", "train", 5, seed=3)
  for t in train[:20]:  # Answers are right.
    a, op, b = t.prompt[:-1].partition("+")
    assert int(t.answer) == int(a) + int(b)


def test_string_tasks_checked_exactly():
  for task in rl_tasks.make_tasks("string", "train", 30, seed=0):
    kind, word = task.prompt.split(": ")
    want = {"reverse": word[::-1], "upper": word.upper(), "length": str(len(word))}[kind]
    assert task.answer == want
    assert rl_tasks.is_correct(task, f" {want} ")
    assert not rl_tasks.is_correct(task, want + "x")


def test_python_tasks_run_in_the_sandbox():
  task = rl_tasks.make_tasks("python", "train", 1, seed=0)[0]
  assert rl_tasks.is_correct(task, task.answer)
  assert rl_tasks.is_correct(task, f"Here:\n```python\n{task.answer}\n```\n")
  assert not rl_tasks.is_correct(task, task.answer.replace("return ", "return 1 + "))


@pytest.mark.parametrize("kwargs,field", [({"family": "chess"}, "rl.task_family"),
                                          ({"split": "dev"}, "rl.split"),
                                          ({"ops": "/"}, "rl.ops"),
                                          ({"heldout_fraction": 1.5}, "rl.heldout_fraction")])
def test_bad_task_settings_name_the_field(kwargs, field):
  args = {"family": "arithmetic", "split": "train", "count": 2, "seed": 0, **kwargs}
  with pytest.raises(config_lib.ConfigError, match=f"config.{field}"):
    rl_tasks.make_tasks(**args)


def test_sft_records_are_valid_dft_records(tmp_path):
  path = str(tmp_path / "a.jsonl")
  tasks = rl_tasks.make_tasks("arithmetic", "train", 3, seed=0)
  assert rl_tasks.write_sft_records(path, tasks) == 3
  with open(path) as f:
    records = [sft.check_record(json.loads(line), path) for line in f]
  assert records[0]["mode"] == "instant"
  assert records[0]["messages"][1]["content"] == tasks[0].answer
