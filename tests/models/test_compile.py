"""torch.compile of our transformer: one graph, no graph breaks, no recompiles, outputs equal eager.

Every compiled call here runs with ``torch._dynamo.config.error_on_recompile=True`` and
``fullgraph=True``: a recompile or a graph break fails the test. The checks are dynamo-level (guards,
graph breaks), so most tests use the ``aot_eager`` backend (dynamo + AOT autograd, no code
generation); one test runs inductor end to end.

Shapes are chosen so that no two sizes coincide (duck sizing would otherwise tie them together
and a later call where they differ would be a legitimate recompile).
"""

import pytest
import torch

from tests.support.tiny import make_pair, make_inputs, run

EQUAL_EAGER = dict(rtol=1e-6, atol=1e-6)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts from an empty compile cache and fails on any recompile."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
    torch._dynamo.reset()


def inputs(img_shapes=((1, 4, 5),), text_width=7, valid=(7, 3), seed=1):
    return make_inputs(batch=2, img_shapes=img_shapes, text_width=text_width, valid=list(valid), seed=seed)


def assert_equals_eager(compiled, model, call_inputs, **tolerance):
    torch.testing.assert_close(run(compiled, call_inputs), run(model, call_inputs), **(tolerance or EQUAL_EAGER))


def test_fullgraph_repeated_calls_do_not_recompile():
    """Same shapes, new values and masks: the RoPE tables are computed in the graph, no cache is mutated."""
    ours, _ = make_pair()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    cases = [inputs(valid=valid, seed=seed) for seed, valid in ((1, (7, 3)), (2, (2, 7)), (3, (7, 7)))]
    outputs = [run(compiled, call_inputs) for call_inputs in cases]
    assert not ours.pos_embed._image_freqs and not ours.pos_embed._text_tables  # compiled calls fill no cache
    for output, call_inputs in zip(outputs, cases):
        torch.testing.assert_close(output, run(ours, call_inputs), **EQUAL_EAGER)


@pytest.mark.parametrize(
    "config, img_shapes",
    [
        ({}, ((1, 4, 5),)),
        ({"zero_cond_t": True}, ((1, 4, 5), (1, 2, 3))),  # Edit-Plus 2511: a target and a condition image
    ],
)
def test_dynamic_new_resolution_and_text_width_do_not_recompile(config, img_shapes):
    ours, _ = make_pair(**config)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager", dynamic=True)
    assert_equals_eager(compiled, ours, inputs(img_shapes=img_shapes))
    grown = tuple((f, h + 2, w + 3) for f, h, w in img_shapes)  # a new resolution, other orientation too
    assert_equals_eager(compiled, ours, inputs(img_shapes=grown, text_width=11, valid=(9, 11), seed=2))
    assert_equals_eager(compiled, ours, inputs(img_shapes=img_shapes[::-1], text_width=13, valid=(5, 13), seed=3))


def test_mark_dynamic_text_width_does_not_recompile():
    """Without dynamic=True, marking the text width dynamic is enough for new prompt widths."""
    ours, _ = make_pair()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    for width, valid, seed in ((7, (7, 3), 1), (13, (13, 2), 2), (30, (4, 30), 3)):
        call_inputs = inputs(text_width=width, valid=valid, seed=seed)
        torch._dynamo.mark_dynamic(call_inputs["encoder_hidden_states"], 1)
        torch._dynamo.mark_dynamic(call_inputs["encoder_hidden_states_mask"], 1)
        assert_equals_eager(compiled, ours, call_inputs)


@pytest.mark.parametrize("dynamic", [None, True])
def test_regional_compile_one_graph_for_all_blocks(dynamic):
    """diffusers' compile_repeated_blocks: every block and every later call share one graph."""
    ours, reference = make_pair(num_layers=3)
    ours.compile_repeated_blocks(fullgraph=True, backend="aot_eager", dynamic=dynamic)
    cases = [inputs(), inputs(valid=(1, 7), seed=2)]
    if dynamic:
        cases += [inputs(img_shapes=((1, 6, 8),), text_width=11, valid=(11, 4), seed=3)]
    for call_inputs in cases:
        # diffusers' class as the eager reference: ours compiled keeps diffusers' numbers
        torch.testing.assert_close(run(ours, call_inputs), run(reference, call_inputs), **EQUAL_EAGER)


def test_training_step_compiles_once_and_matches_eager_gradients():
    """Inputs that require grad (an RL trainer step): forward + backward, twice, no recompile."""
    ours, _ = make_pair(seed=3)
    ours.train()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")

    def loss_and_grads(model, seed):
        call_inputs = inputs(seed=seed)
        call_inputs["hidden_states"].requires_grad_(True)
        ours.zero_grad()
        loss = model(**call_inputs).sample.square().mean()
        loss.backward()
        grads = {name: p.grad.clone() for name, p in ours.named_parameters() if p.grad is not None}
        return loss.detach(), call_inputs["hidden_states"].grad, grads

    for seed in (1, 2):
        expected, got = loss_and_grads(ours, seed), loss_and_grads(compiled, seed)
        torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-7)
        assert got[2].keys() == expected[2].keys() and len(expected[2]) > 0
        for name, grad in expected[2].items():
            torch.testing.assert_close(got[2][name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
def test_inductor_fullgraph_equals_eager_without_recompiles():
    """The default backend end to end (C++ code generation on the CPU), one small block to keep it quick."""
    ours, _ = make_pair(num_layers=1)
    compiled = torch.compile(ours, fullgraph=True)
    for seed, valid in ((1, (7, 3)), (2, (2, 7))):
        assert_equals_eager(compiled, ours, inputs(valid=valid, seed=seed), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "config, img_shapes",
    [
        ({}, [[(1, 4, 5)], [(1, 5, 4)]]),  # transposed grids: per-sample RoPE tables
        ({"zero_cond_t": True}, [[(1, 4, 5), (1, 2, 3)], [(1, 2, 3), (1, 4, 5)]]),  # and per-sample modulate_index
    ],
)
def test_fullgraph_per_sample_tables_repeated_calls_do_not_recompile(config, img_shapes):
    """Samples with different shapes: the per-sample tables are built in the graph, once per shape set."""
    ours, _ = make_pair(**config)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    cases = []
    for seed, valid in ((1, (7, 3)), (2, (2, 7)), (3, (7, 7))):
        call_inputs = inputs(img_shapes=img_shapes[0], valid=valid, seed=seed)
        cases.append({**call_inputs, "img_shapes": img_shapes})
    outputs = [run(compiled, call_inputs) for call_inputs in cases]
    assert not ours.pos_embed._image_freqs and not ours.pos_embed._text_tables  # compiled calls fill no cache
    for output, call_inputs in zip(outputs, cases):
        torch.testing.assert_close(output, run(ours, call_inputs), **EQUAL_EAGER)


def test_dynamic_per_sample_tables_new_grids_do_not_recompile():
    """dynamic=True: other grids of the same kinds and other text widths reuse the graph."""
    ours, _ = make_pair(zero_cond_t=True)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager", dynamic=True)
    for seed, (img_shapes, width, valid) in enumerate(
        [
            ([[(1, 4, 5), (1, 2, 3)], [(1, 2, 3), (1, 4, 5)]], 7, (7, 3)),
            ([[(1, 6, 7), (1, 3, 4)], [(1, 3, 4), (1, 6, 7)]], 11, (9, 11)),
        ],
        start=1,
    ):
        call_inputs = inputs(img_shapes=img_shapes[0], text_width=width, valid=valid, seed=seed)
        assert_equals_eager(compiled, ours, {**call_inputs, "img_shapes": img_shapes})
