"""The main job runs end to end and learns; bad flags fail clearly."""

import numpy as np
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


@pytest.mark.parametrize("offload_names", [(), ("fc1_input", "activation_input")])
def test_lm_layer_scans_match_the_python_loop(offload_names):
  import jax
  import numpy as np
  from flax import nnx
  from jaxmoe import lm

  batch = jax.random.randint(jax.random.key(1), (2, 17), 0, 11)
  results = []
  for scan_layers, pipelined in ((False, False), (True, False), (True, True)):
    cfg = lm.LMConfig(vocab_size=11, seq_len=16, num_layers=3, backend="xla",
                      dtype="float32", offload_names=offload_names,
                      scan_layers=scan_layers, pipelined_offload=pipelined)
    model = lm.MoETransformerLM(cfg, rngs=nnx.Rngs(0))
    loss_fn = lambda m: lm.next_token_loss(m, batch)[0]  # noqa: E731
    loss, grads = jax.jit(lambda s: jax.value_and_grad(
        lambda s: loss_fn(nnx.merge(nnx.graphdef(model), s)))(s))(nnx.state(model))
    results.append((loss, jax.tree.leaves(grads)))
  (loss_loop, grads_loop), (loss_nnx, grads_nnx), (loss_pipe, grads_pipe) = results
  np.testing.assert_allclose(loss_nnx, loss_loop, rtol=1e-5)
  for g_scan, g_loop in zip(grads_nnx, grads_loop):
    np.testing.assert_allclose(g_scan, g_loop, rtol=1e-4, atol=1e-6)
  # The two scans run the same layer program: bitwise equal.
  np.testing.assert_array_equal(loss_pipe, loss_nnx)
  for g_pipe, g_nnx in zip(grads_pipe, grads_nnx):
    np.testing.assert_array_equal(g_pipe, g_nnx)


def test_lm_picks_the_layer_scan_by_the_covering_rule():
  from jaxmoe import lm
  cfg = lambda **kw: lm.LMConfig(vocab_size=11, seq_len=16, model_dim=1024,  # noqa: E731
                                 ffn_size=4096, top_k=2, **kw)
  # Default placement: 2*(1024*4096*3) / (2*(1024+4096)) ~ 2,458 FLOPs per byte, below
  # the ~11,500 at which copies hide in their own layer.
  assert cfg().uses_layer_scan()
  # moe_input: 2*top_k*F = 16,384 FLOPs per byte, the copy hides inside the layer.
  assert not cfg(offload_names=("moe_input",), recompute_names=("fc1_input",)).uses_layer_scan()
  assert cfg(offload_names=("moe_input",), pipelined_offload=True).uses_layer_scan()
  assert not cfg(pipelined_offload=False).uses_layer_scan()
  assert not cfg(offload_names=()).uses_layer_scan()
  assert not cfg(scan_layers=False).uses_layer_scan()


def test_demo_trains_with_fp8_close_to_bf16():
  """--fp8 (at its default preset, cpu128) learns like the same model without it.
  Over 500 steps the final losses differed by 0.02 % (benchmarks/fp8_training.py)."""
  fp8 = demo.train(demo.parse_args(["--fp8", "--steps", "25"]))
  base = demo.train(demo.parse_args(["--preset", "cpu128", "--steps", "25"]))
  assert fp8["fp8"] and fp8["preset"] == "cpu128" and not base["fp8"]
  assert np.isfinite(fp8["last_loss"]) and fp8["last_loss"] < fp8["first_loss"] - 0.3
  assert abs(fp8["last_loss"] - base["last_loss"]) / base["last_loss"] < 0.01, (fp8, base)


def test_demo_fp8_rejects_widths_that_are_not_multiples_of_128():
  with pytest.raises(ValueError, match="multiple of 128, got H=64"):
    demo.train(demo.parse_args(["--fp8", "--preset", "cpu", "--steps", "1"]))
