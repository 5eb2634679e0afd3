"""Expert LoRA with expert parallelism (ep 2, ZeRO-3, 2 CPU processes, gloo): the LoRA gradients
of every expert (and of attention and router) equal the single-process ones, and so do the
losses of a few steps. The worker is lora_ep_worker.run, in the suite's shared 2-process ZeRO-3
launch (the zero3_runs fixture, tests/conftest.py)."""


def test_lora_ep2_zero3_gradient_parity(zero3_runs):
    res = zero3_runs["lora_ep"]
    grads = res["grads"]
    assert any(".mlp.experts.base_layer.lora_A." in n for n in grads)  # gate_up LoRA
    assert any(".mlp.experts.lora_B." in n for n in grads)  # down LoRA
    assert any(".mlp.gate.lora_A." in n for n in grads)  # router LoRA
    for name, (diff, scale) in grads.items():
        assert scale > 0, f"{name}: zero reference gradient"
        assert diff <= 1e-5 + 1e-4 * scale, f"{name}: |grad - ref| = {diff:.3g} (ref max {scale:.3g})"
    for got, want in zip(res["losses"], res["ref_losses"]):
        assert abs(got - want) <= 1e-4 * max(1.0, abs(want)), (res["losses"], res["ref_losses"])
