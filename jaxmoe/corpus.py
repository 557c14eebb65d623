"""A synthetic language with structure to learn: lines of integer arithmetic.

Each line is `a+b=c;` or `a-b=c;` with random operands, so a model can lower its
loss on the operator, `=`, `;` and, by learning to add, on every digit of `c`.
Made on the fly from a seed: nothing is downloaded.
"""

from __future__ import annotations

import numpy as np

ALPHABET = "0123456789+-=;"
VOCAB_SIZE = len(ALPHABET)
_CODE = {ch: i for i, ch in enumerate(ALPHABET)}


def encode(text: str) -> np.ndarray:
  """Characters of ALPHABET -> int32 token ids."""
  try:
    return np.array([_CODE[ch] for ch in text], dtype=np.int32)
  except KeyError as e:
    raise ValueError(f"Character {e.args[0]!r} is not in the alphabet {ALPHABET!r}.") from None


def decode(tokens) -> str:
  return "".join(ALPHABET[int(t)] for t in tokens)


def arithmetic_text(num_lines: int, max_operand: int, rng: np.random.Generator) -> str:
  """`num_lines` lines of `a+b=c;` / `a-b=c;` with 0 <= a, b < max_operand, c >= 0."""
  a = rng.integers(0, max_operand, num_lines)
  b = rng.integers(0, max_operand, num_lines)
  minus = rng.random(num_lines) < 0.5
  a, b = np.where(minus, np.maximum(a, b), a), np.where(minus, np.minimum(a, b), b)
  c = np.where(minus, a - b, a + b)
  ops = np.where(minus, "-", "+")
  return "".join(f"{x}{o}{y}={z};" for x, o, y, z in zip(a, ops, b, c))


class ArithmeticBatches:
  """Endless batches of token windows [batch, seq_len + 1] over a fixed corpus."""

  def __init__(self, batch_size: int, seq_len: int, *, max_operand: int = 1000,
               num_lines: int = 200_000, seed: int = 0):
    self._rng = np.random.default_rng(seed)
    self.tokens = encode(arithmetic_text(num_lines, max_operand, self._rng))
    if self.tokens.size <= seq_len + 1:
      raise ValueError(f"Corpus of {self.tokens.size} tokens is too short for seq_len={seq_len}.")
    self.batch_size = batch_size
    self.seq_len = seq_len

  def __iter__(self):
    return self

  def __next__(self) -> np.ndarray:
    starts = self._rng.integers(0, self.tokens.size - self.seq_len - 1, self.batch_size)
    return np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts])
