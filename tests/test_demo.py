"""The main job runs end to end and learns; bad flags fail clearly."""

import pytest

from jaxmoe import demo


def test_demo_trains_with_offload_on(capsys):
  summary = demo.train(demo.parse_args(["--steps", "60"]))
  assert summary["offload_names"] == ("fc1_input", "activation_input")
  assert summary["last_loss"] < summary["first_loss"] - 0.3, summary
  assert summary["tokens_per_s"] > 0
  out = capsys.readouterr()
  assert "tokens/s" in out.out and "60/60" in out.err


def test_demo_rejects_unknown_residual_name():
  with pytest.raises(ValueError, match="valid names are"):
    demo.train(demo.parse_args(["--steps", "1", "--offload-names", "fc1_input,x"]))
