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


def test_demo_writes_the_compiled_step_hlo(tmp_path, capsys):
  path = tmp_path / "step.hlo"
  demo.train(demo.parse_args(["--steps", "2", "--hlo-out", str(path)]))
  assert "ENTRY" in path.read_text()
  assert "copy_start" in capsys.readouterr().out


def test_offload_summary_counts_host_moves():
  from jaxmoe import hlo_report
  text = "\n".join([
      "  %cs = (bf16[8,16]{1,0:S(5)}, u32[]) copy-start(bf16[8,16]{1,0} %a)",
      "  %cd = bf16[8,16]{1,0:S(5)} copy-done(%cs)",
      "  %d = bf16[4,8,16]{2,1,0:S(5)} dynamic-update-slice(%buf, %x, %i, %z, %z)",
      "  %k = bf16[8,16]{1,0} custom-call(%p), custom_call_target=\"mosaic_gpu\"",
  ])
  assert hlo_report.offload_summary(text) == {
      "host_shapes": 3, "copy_start": 1, "copy_done": 1, "host_dynamic_update_slice": 1,
      "host_dynamic_slice": 0, "custom_calls": 1}
