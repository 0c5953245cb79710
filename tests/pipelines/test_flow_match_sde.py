"""FlowMatchSDEDiscreteScheduler against the SDE / CPS / DanceGRPO formulas written out here in float64.

The reference functions below restate the formulas independently of the scheduler's helpers; the
scheduler's noise is reproduced from the same seeded generator.
"""

import json
import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from qwen_image_omni.pipelines.checks import MIN_NOISE_LEVEL
from qwen_image_omni.pipelines.schedulers import FlowMatchSDEDiscreteScheduler, FlowMatchSDEDiscreteSchedulerOutput
from qwen_image_omni.pipelines.qwen_image_flow_grpo import QWEN_IMAGE_SCHEDULER_CONFIG  # Qwen/Qwen-Image's scheduler config

SDE_TYPES = ["sde", "cps", "dance_sde"]
SHAPE = (3, 5, 4)
ETA = 0.7
NUM_STEPS = 8
LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))



def qwen_image_mu(image_seq_len, config=QWEN_IMAGE_SCHEDULER_CONFIG):
    """The QwenImagePipeline's `calculate_shift`: mu linear in the image sequence length."""
    slope = (config["max_shift"] - config["base_shift"]) / (config["max_image_seq_len"] - config["base_image_seq_len"])
    return config["base_shift"] + slope * (image_seq_len - config["base_image_seq_len"])


def qwen_image_scheduler(cls=FlowMatchSDEDiscreteScheduler, num_steps=NUM_STEPS, image_seq_len=1024):
    """A scheduler set up the way QwenImagePipeline sets it: linear sigmas plus a resolution shift."""
    scheduler = cls.from_config(QWEN_IMAGE_SCHEDULER_CONFIG)
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    scheduler.set_timesteps(sigmas=sigmas, mu=qwen_image_mu(image_seq_len))
    return scheduler


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)


def noise_for(seed):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def per_sample(values):
    return torch.as_tensor(values, dtype=torch.float64).reshape(-1, 1, 1).expand(SHAPE[0], 1, 1)


# ---- reference formulas (float64) -------------------------------------------------------------
# Each returns (noise std, reported std_dev_t, mean, log-prob without normalizer, normalizer).


def reference_sde(x, v, sigma, sigma_next, sigma_1, eta):
    dt = sigma_next - sigma
    sigma_tilde = torch.where(sigma == 1, torch.full_like(sigma, sigma_1), sigma)
    s = eta * torch.sqrt(sigma / (1 - sigma_tilde))
    mean = x * (1 + s**2 * dt / (2 * sigma)) + v * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
    std = s * torch.sqrt(-dt)
    return std, s, mean


def reference_cps(x, v, sigma, sigma_next, sigma_1, eta):
    s = sigma_next * math.sin(eta * math.pi / 2)
    x0 = x - sigma * v
    x1 = x + (1 - sigma) * v
    mean = (1 - sigma_next) * x0 + torch.sqrt(sigma_next**2 - s**2) * x1
    return s, s, mean


def reference_dance_sde(x, v, sigma, sigma_next, sigma_1, eta):
    dt = sigma_next - sigma
    x1 = x + (1 - sigma) * v
    mean = x + dt * v + (eta**2 / (2 * sigma)) * x1 * dt
    s = eta * torch.sqrt(sigma - sigma_next)
    return s, s, mean


REFERENCE = {"sde": reference_sde, "cps": reference_cps, "dance_sde": reference_dance_sde}


def reference_log_prob(sde_type, prev, mean, std, normalizer):
    if sde_type == "cps":
        return (-((prev - mean) ** 2)).mean(dim=(1, 2))
    log_prob = -((prev - mean) ** 2) / (2 * std**2)
    if normalizer:
        log_prob = log_prob - torch.log(std) - LOG_SQRT_2PI
    return log_prob.mean(dim=(1, 2))


def reference_step(sde_type, scheduler, x, v, steps, noise=None, prev=None, eta=ETA, normalizer=True):
    """(prev, log_prob, mean, std_dev_t) in float64 for samples at schedule indices `steps`."""
    sigmas = scheduler.sigmas.double()
    sigma, sigma_next = per_sample(sigmas[steps]), per_sample(sigmas[[k + 1 for k in steps]])
    std, std_dev_t, mean = REFERENCE[sde_type](x.double(), v.double(), sigma, sigma_next, sigmas[1].item(), eta)
    if prev is None:
        prev = mean + std * noise.double()
    log_prob = reference_log_prob(sde_type, prev.double(), mean, std, normalizer)
    return prev, log_prob, mean, std_dev_t


def assert_close(actual, expected, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(actual.double(), expected.double().expand_as(actual), rtol=rtol, atol=atol)


# ---- formulas ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sde_type", SDE_TYPES)
@pytest.mark.parametrize("step", [0, 3, NUM_STEPS - 1])
def test_step_index_mode_matches_formulas(sde_type, step):
    scheduler = qwen_image_scheduler()
    scheduler.set_begin_index(step)
    x, v, _ = inputs()
    out = scheduler.step(
        v, scheduler.timesteps[step], x, noise_level=ETA, sde_type=sde_type, generator=torch.Generator().manual_seed(7)
    )
    expected = reference_step(sde_type, scheduler, x, v, [step] * SHAPE[0], noise=noise_for(7))

    assert isinstance(out, FlowMatchSDEDiscreteSchedulerOutput)
    assert out.log_prob.shape == (SHAPE[0],) and out.std_dev_t.shape == (SHAPE[0], 1, 1)
    for got, want in zip((out.prev_sample, out.log_prob, out.prev_sample_mean, out.std_dev_t), expected):
        assert torch.isfinite(got).all()
        assert_close(got, want)
    assert scheduler.step_index == step + 1


@pytest.mark.parametrize("sde_type", SDE_TYPES)
def test_timestep_tensor_mode_matches_formulas_with_samples_at_different_steps(sde_type):
    scheduler = qwen_image_scheduler()
    steps = [0, 4, NUM_STEPS - 1]
    x, v, _ = inputs()
    got = scheduler.sample_previous_step(
        x, v, timestep=scheduler.timesteps[steps], noise_level=ETA, sde_type=sde_type,
        generator=torch.Generator().manual_seed(3),
    )
    expected = reference_step(sde_type, scheduler, x, v, steps, noise=noise_for(3))
    assert len(got) == 4
    for g, e in zip(got, expected):
        assert_close(g, e)
    assert scheduler.step_index is None  # sample_previous_step never touches the step index


def test_sde_uses_second_sigma_at_sigma_one():
    scheduler = qwen_image_scheduler()
    assert scheduler.sigmas[0] == 1.0
    x, v, _ = inputs()
    std_dev_t = scheduler.sample_previous_step(x, v, timestep=scheduler.timesteps[0], sde_type="sde")[3]
    sigma_1 = scheduler.sigmas[1].double()
    assert_close(std_dev_t, ETA * torch.sqrt(1 / (1 - sigma_1)))


# ---- modes and options ------------------------------------------------------------------------


@pytest.mark.parametrize("sde_type", SDE_TYPES)
def test_timestep_tensor_lookup_equals_step_index_mode(sde_type):
    scheduler = qwen_image_scheduler()
    steps = [5, 0, 2]
    x, v, prev = inputs()
    batched = scheduler.sample_previous_step(
        x, v, timestep=scheduler.timesteps[steps], prev_sample=prev, sde_type=sde_type, return_sqrt_dt=True
    )
    for i, step in enumerate(steps):
        sequential = qwen_image_scheduler()
        sequential.set_begin_index(step)
        one = sequential.step(v[i : i + 1], sequential.timesteps[step], x[i : i + 1], prev_sample=prev[i : i + 1],
                              sde_type=sde_type, return_dict=False)
        assert sequential.step_index == step + 1
        for b, o in zip(batched[:4], one):
            torch.testing.assert_close(b[i : i + 1], o, rtol=0, atol=0)
        sqrt_dt = scheduler.sample_previous_step(
            x[i : i + 1], v[i : i + 1], timestep=scheduler.timesteps[step : step + 1], return_sqrt_dt=True
        )[4]
        torch.testing.assert_close(batched[4][i : i + 1], sqrt_dt, rtol=0, atol=0)


def test_scalar_timestep_applies_to_the_whole_batch():
    scheduler = qwen_image_scheduler()
    x, v, prev = inputs()
    t = scheduler.timesteps[2]
    scalar = scheduler.sample_previous_step(x, v, timestep=t, prev_sample=prev)
    batched = scheduler.sample_previous_step(x, v, timestep=t.expand(SHAPE[0]), prev_sample=prev)
    for a, b in zip(scalar, batched):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_step_with_timestep_tensor_leaves_step_index_alone():
    scheduler = qwen_image_scheduler()
    x, v, _ = inputs()
    scheduler.step(v, scheduler.timesteps[[1, 2, 3]], x)
    assert scheduler.step_index is None
    scheduler.step(v, scheduler.timesteps[0], x)
    scheduler.step(v, scheduler.timesteps[[1, 2, 3]], x)
    assert scheduler.step_index == 1


@pytest.mark.parametrize("sde_type", SDE_TYPES)
def test_log_prob_of_a_given_prev_sample(sde_type):
    scheduler = qwen_image_scheduler()
    steps = [1, 3, 6]
    x, v, prev = inputs()
    timesteps = scheduler.timesteps[steps]
    got = scheduler.sample_previous_step(x, v, timestep=timesteps, prev_sample=prev, sde_type=sde_type)
    assert got[0] is prev
    expected = reference_step(sde_type, scheduler, x, v, steps, prev=prev)
    assert_close(got[1], expected[1])

    # A trainer recomputing the log-prob of a rollout's own sample gets the rollout's value back.
    rollout = scheduler.sample_previous_step(x, v, timestep=timesteps, sde_type=sde_type,
                                             generator=torch.Generator().manual_seed(1))
    recomputed = scheduler.sample_previous_step(x, v, timestep=timesteps, prev_sample=rollout[0], sde_type=sde_type)
    torch.testing.assert_close(recomputed[1], rollout[1], rtol=0, atol=0)


@pytest.mark.parametrize("sde_type", SDE_TYPES)
def test_logprob_normalizer_on_off(sde_type):
    scheduler = qwen_image_scheduler()
    steps = [0, 3, 6]
    x, v, prev = inputs()
    kwargs = dict(timestep=scheduler.timesteps[steps], prev_sample=prev, sde_type=sde_type)
    with_norm = scheduler.sample_previous_step(x, v, include_logprob_normalizer=True, **kwargs)[1]
    without = scheduler.sample_previous_step(x, v, include_logprob_normalizer=False, **kwargs)[1]
    expected = reference_step(sde_type, scheduler, x, v, steps, prev=prev, normalizer=False)[1]
    assert_close(without, expected)
    if sde_type == "cps":
        torch.testing.assert_close(with_norm, without, rtol=0, atol=0)
    else:
        noise_std = REFERENCE[sde_type](x.double(), v.double(), per_sample(scheduler.sigmas.double()[steps]),
                                        per_sample(scheduler.sigmas.double()[[k + 1 for k in steps]]),
                                        scheduler.sigmas[1].item(), ETA)[0].reshape(-1)
        assert_close(with_norm - without, -torch.log(noise_std) - LOG_SQRT_2PI)


def test_return_logprobs_false():
    scheduler = qwen_image_scheduler()
    x, v, _ = inputs()
    out = scheduler.step(v, scheduler.timesteps[0], x, return_logprobs=False)
    assert out.log_prob is None and torch.isfinite(out.prev_sample).all()


def test_sqrt_dt():
    scheduler = qwen_image_scheduler()
    x, v, _ = inputs()
    steps = [0, 3, NUM_STEPS - 1]
    sigmas = scheduler.sigmas.double()
    got = scheduler.sample_previous_step(x, v, timestep=scheduler.timesteps[steps], return_sqrt_dt=True)
    assert len(got) == 5 and got[4].shape == (SHAPE[0],)
    assert_close(got[4], torch.sqrt(sigmas[steps] - sigmas[[k + 1 for k in steps]]))

    scheduler.step(v, scheduler.timesteps[0], x)  # internal step index is now 1
    got = scheduler.sample_previous_step(x, v, return_sqrt_dt=True)
    assert got[4].shape == (SHAPE[0],)
    assert_close(got[4], torch.sqrt(sigmas[1] - sigmas[2]).expand(SHAPE[0]))
    assert len(scheduler.sample_previous_step(x, v)) == 4


def test_step_tuple_order_matches_output_fields():
    x, v, _ = inputs()
    outputs = []
    for return_dict in (True, False):
        scheduler = qwen_image_scheduler()
        outputs.append(scheduler.step(v, scheduler.timesteps[0], x, generator=torch.Generator().manual_seed(0),
                                      return_dict=return_dict))
    as_dict, as_tuple = outputs
    assert len(as_tuple) == 4
    fields = (as_dict.prev_sample, as_dict.log_prob, as_dict.prev_sample_mean, as_dict.std_dev_t)
    for field, item in zip(fields, as_tuple):
        torch.testing.assert_close(field, item, rtol=0, atol=0)


# ---- noise level 0 and deterministic steps ----------------------------------------------------


@pytest.mark.parametrize("sde_type", SDE_TYPES)
def test_zero_noise_level_is_the_euler_step(sde_type):
    ours = qwen_image_scheduler()
    euler = qwen_image_scheduler(FlowMatchEulerDiscreteScheduler)
    x_ours, _, _ = inputs()
    x_euler = x_ours.clone()
    for i, t in enumerate(ours.timesteps):
        v = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + i))
        out = ours.step(v, t, x_ours, noise_level=0.0, sde_type=sde_type)
        x_euler = euler.step(v, t, x_euler).prev_sample
        if sde_type == "cps":  # same value, rearranged arithmetic
            torch.testing.assert_close(out.prev_sample, x_euler, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(out.prev_sample, x_euler)
        assert torch.equal(out.prev_sample, out.prev_sample_mean)
        assert torch.equal(out.log_prob, torch.zeros(SHAPE[0]))
        x_ours = out.prev_sample
    assert ours.step_index == euler.step_index == NUM_STEPS


@pytest.mark.parametrize("sde_type", SDE_TYPES)
def test_sigma_zero_step_is_finite_identity(sde_type):
    scheduler = FlowMatchSDEDiscreteScheduler()
    scheduler.set_timesteps(sigmas=[1.0, 0.5, 0.0])  # last timestep is 0: sigma == sigma' == 0
    assert scheduler.timesteps[-1] == 0 and scheduler.sigmas[-1] == 0
    x, v, _ = inputs()
    v.requires_grad_(True)
    prev, log_prob, mean, std_dev_t, sqrt_dt = scheduler.sample_previous_step(
        x, v, timestep=scheduler.timesteps[-1], sde_type=sde_type, return_sqrt_dt=True
    )
    torch.testing.assert_close(prev, x, rtol=0, atol=0)
    torch.testing.assert_close(mean, x, rtol=0, atol=0)
    assert torch.equal(log_prob, torch.zeros(SHAPE[0])) and torch.equal(std_dev_t, torch.zeros(SHAPE[0], 1, 1))
    assert torch.equal(sqrt_dt, torch.zeros(SHAPE[0]))
    log_prob.sum().backward()
    assert torch.isfinite(v.grad).all()


@pytest.mark.parametrize("sde_type", ["sde", "dance_sde"])
def test_log_prob_gradient_is_finite_in_a_batch_with_a_deterministic_sample(sde_type):
    scheduler = FlowMatchSDEDiscreteScheduler()
    scheduler.set_timesteps(sigmas=[1.0, 0.5, 0.0])
    x, v, prev = inputs()
    v.requires_grad_(True)
    log_prob = scheduler.sample_previous_step(
        x, v, timestep=scheduler.timesteps[[1, 2, 1]], prev_sample=prev, sde_type=sde_type
    )[1]
    assert torch.isfinite(log_prob).all() and log_prob[1] == 0 and log_prob[0] != 0
    log_prob.sum().backward()
    assert torch.isfinite(v.grad).all()
    assert v.grad[1].abs().sum() == 0 and v.grad[0].abs().sum() > 0


# ---- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sample", "model_output", "prev_sample"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_non_fp32_inputs_are_rejected_by_name(name, dtype):
    scheduler = qwen_image_scheduler()
    x, v, prev = inputs()
    kwargs = {"sample": x, "model_output": v, "prev_sample": prev}
    kwargs[name] = kwargs[name].to(dtype)
    with pytest.raises(TypeError, match=f"`{name}` must be float32"):
        scheduler.sample_previous_step(timestep=scheduler.timesteps[0], **kwargs)
    with pytest.raises(TypeError, match=f"`{name}` must be float32"):
        scheduler.step(kwargs["model_output"], scheduler.timesteps[0], kwargs["sample"],
                       prev_sample=kwargs["prev_sample"])


def test_unknown_sde_type():
    scheduler = qwen_image_scheduler()
    x, v, _ = inputs()
    with pytest.raises(ValueError, match="Unknown sde_type 'ode'"):
        scheduler.step(v, scheduler.timesteps[0], x, sde_type="ode")


def test_per_token_timesteps_not_implemented():
    scheduler = qwen_image_scheduler()
    x, v, _ = inputs()
    with pytest.raises(NotImplementedError, match="per_token_timesteps"):
        scheduler.step(v, scheduler.timesteps[0], x, per_token_timesteps=torch.ones(SHAPE[:2]))


@pytest.mark.parametrize(
    "timestep, match",
    [
        (0, "integer indices"),
        (torch.tensor([0, 1, 2]), "integer indices"),
        (torch.tensor([123.456, 0.5, 1.0]), r"not in scheduler.timesteps"),
        (torch.ones(2), "one entry per sample"),
    ],
)
def test_bad_timesteps(timestep, match):
    scheduler = qwen_image_scheduler()
    x, v, _ = inputs()
    with pytest.raises(ValueError, match=match):
        scheduler.sample_previous_step(x, v, timestep=timestep)


def test_other_bad_arguments():
    scheduler = qwen_image_scheduler()
    x, v, prev = inputs()
    with pytest.raises(ValueError, match="No step index yet"):
        scheduler.sample_previous_step(x, v)
    with pytest.raises(ValueError, match="`prev_sample` has shape"):
        scheduler.step(v, scheduler.timesteps[0], x, prev_sample=prev[:, :2])
    with pytest.raises(ValueError, match="integer indices"):
        scheduler.step(v, 0, x)
    with pytest.raises(TypeError, match="^`sample` must be a torch.Tensor, got list$"):
        scheduler.sample_previous_step(x.tolist(), v, timestep=scheduler.timesteps[0])


@pytest.mark.parametrize(
    ("noise_level", "sde_type", "error", "message"),
    [
        (float("nan"), "sde", ValueError, "`noise_level` must be a finite number >= 0.0, got nan"),
        (float("inf"), "dance_sde", ValueError, "`noise_level` must be a finite number >= 0.0, got inf"),
        (-0.1, "sde", ValueError, "`noise_level` must be a finite number >= 0.0, got -0.1"),
        (3.0, "cps", ValueError, r"`noise_level` must be <= 1 for sde_type='cps' \(its noise std is sigma' \* sin"),
        (torch.tensor(0.7), "sde", TypeError, "`noise_level` must be a number, got Tensor"),
        (True, "sde", TypeError, "`noise_level` must be a number, got bool True"),
    ],
)
@pytest.mark.parametrize("entry", ["step", "sample_previous_step"])
def test_bad_noise_level_is_rejected_before_any_output(noise_level, sde_type, error, message, entry):
    scheduler = qwen_image_scheduler()
    x, v, _ = inputs()
    with pytest.raises(error, match=f"^{message}"):
        if entry == "step":
            scheduler.step(v, scheduler.timesteps[0], x, noise_level=noise_level, sde_type=sde_type)
        else:
            scheduler.sample_previous_step(x, v, timestep=scheduler.timesteps[0], noise_level=noise_level,
                                           sde_type=sde_type)  # fmt: skip


def test_cps_noise_level_one_is_accepted():
    scheduler = qwen_image_scheduler()
    x, v, _ = inputs()
    _, log_prob, _, std = scheduler.sample_previous_step(
        x, v, timestep=scheduler.timesteps[1], noise_level=1.0, sde_type="cps"
    )
    assert torch.isfinite(log_prob).all()
    assert_close(std, scheduler.sigmas[2].double())  # sigma' * sin(pi / 2)


def test_scalar_timestep_not_in_the_schedule():
    scheduler = qwen_image_scheduler()
    x, v, _ = inputs()
    for timestep in (123.456, torch.tensor(123.456)):
        with pytest.raises(ValueError, match=r"^`timestep` values \[123.45\d+\] are not in scheduler.timesteps"):
            scheduler.step(v, timestep, x)
        assert scheduler.step_index is None


def test_scalar_timestep_must_be_the_current_step():
    scheduler = qwen_image_scheduler()
    x, v, _ = inputs()
    scheduler.step(v, scheduler.timesteps[0], x)
    expected = scheduler.timesteps[1].item()
    with pytest.raises(ValueError, match=rf"^`timestep` {scheduler.timesteps[0].item()} is not the current step's: "
                                         rf"scheduler.timesteps\[1\] = {expected}; pass the timesteps in order"):
        scheduler.step(v, scheduler.timesteps[0], x)
    assert scheduler.step_index == 1
    scheduler.step(v, expected, x)  # a Python float of the right value is fine
    assert scheduler.step_index == 2


def test_step_past_the_end_of_the_schedule():
    scheduler = qwen_image_scheduler()
    x, v, _ = inputs()
    for timestep in scheduler.timesteps:
        x = scheduler.step(v, timestep, x).prev_sample
    message = rf"^all {NUM_STEPS} steps of the schedule are taken \(step_index={NUM_STEPS}\); call `set_timesteps`"
    with pytest.raises(ValueError, match=message):
        scheduler.step(v, scheduler.timesteps[-1], x)
    with pytest.raises(ValueError, match=message):
        scheduler.sample_previous_step(x, v)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / NUM_STEPS, NUM_STEPS), mu=qwen_image_mu(1024))
    assert scheduler.step_index is None
    assert torch.isfinite(scheduler.step(v, scheduler.timesteps[0], x).log_prob).all()


@pytest.mark.parametrize("entry", ["step", "sample_previous_step", "step_per_sample"])
def test_no_steps_before_set_timesteps(entry):
    scheduler = FlowMatchSDEDiscreteScheduler.from_config(QWEN_IMAGE_SCHEDULER_CONFIG)
    x, v, _ = inputs()
    timestep = scheduler.timesteps[0]
    with pytest.raises(ValueError, match="^the scheduler has no inference schedule yet: call `set_timesteps` first$"):
        if entry == "step":
            scheduler.step(v, timestep, x)
        elif entry == "step_per_sample":
            scheduler.step(v, timestep.expand(SHAPE[0]), x)
        else:
            scheduler.sample_previous_step(x, v, timestep=timestep)


@pytest.mark.parametrize(
    ("generator", "error", "message"),
    [
        ([torch.Generator()] * 2, ValueError,
         r"^`generator` must be a single torch.Generator or a list of one per sample \(3\), got a list of 2$"),
        ([torch.Generator()] * 4, ValueError, r"one per sample \(3\), got a list of 4$"),
        ([], ValueError, r"one per sample \(3\), got a list of 0$"),
        ([torch.Generator(), 0, torch.Generator()], TypeError,
         "^`generator` must be a list of torch.Generator, got one holding int$"),
        (7, TypeError, "^`generator` must be a torch.Generator, a list of them or None, got int$"),
    ],
)  # fmt: skip
def test_bad_generators(generator, error, message):
    scheduler = qwen_image_scheduler()
    x, v, _ = inputs()
    with pytest.raises(error, match=message):
        scheduler.sample_previous_step(x, v, timestep=scheduler.timesteps[0], generator=generator)


def test_generator_list_draws_each_sample_from_its_own_generator():
    scheduler = qwen_image_scheduler()
    x, v, _ = inputs()
    generators = [torch.Generator().manual_seed(seed) for seed in (1, 2, 3)]
    prev, _, mean, std_dev_t = scheduler.sample_previous_step(x, v, timestep=scheduler.timesteps[2],
                                                              generator=generators)  # fmt: skip
    dt = scheduler.sigmas[3] - scheduler.sigmas[2]
    for i, seed in enumerate((1, 2, 3)):
        noise = torch.randn(SHAPE[1:], generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(prev[i], mean[i] + std_dev_t[i] * torch.sqrt(-dt) * noise)


# ---- config, loading, a Qwen-Image schedule ---------------------------------------------------


def test_save_pretrained_round_trip(tmp_path):
    scheduler = FlowMatchSDEDiscreteScheduler(shift=3.0, use_dynamic_shifting=False, shift_terminal=0.05)
    scheduler.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "FlowMatchSDEDiscreteScheduler"
    loaded = FlowMatchSDEDiscreteScheduler.from_pretrained(tmp_path)
    assert type(loaded) is FlowMatchSDEDiscreteScheduler
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(scheduler.config)


def test_loads_qwen_image_scheduler_folder_and_runs_a_rollout(tmp_path):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(QWEN_IMAGE_SCHEDULER_CONFIG))
    scheduler = FlowMatchSDEDiscreteScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    for key, value in QWEN_IMAGE_SCHEDULER_CONFIG.items():
        if not key.startswith("_"):
            assert scheduler.config[key] == value
    sigmas = np.linspace(1.0, 1 / NUM_STEPS, NUM_STEPS)
    scheduler.set_timesteps(sigmas=sigmas, mu=qwen_image_mu(4096))
    assert len(scheduler.timesteps) == NUM_STEPS and scheduler.sigmas[-1] == 0
    assert scheduler.sigmas[-2].item() == pytest.approx(0.02)  # shift_terminal

    for sde_type in SDE_TYPES:
        scheduler.set_timesteps(sigmas=sigmas, mu=qwen_image_mu(4096))
        generator = torch.Generator().manual_seed(0)
        latents, _, _ = inputs()
        trajectory, velocities, log_probs = [latents], [], []
        for t in scheduler.timesteps:
            v = torch.randn(SHAPE, generator=generator)
            out = scheduler.step(v, t, latents, generator=generator, sde_type=sde_type)
            latents = out.prev_sample
            trajectory.append(latents)
            velocities.append(v)
            log_probs.append(out.log_prob)
            assert torch.isfinite(latents).all() and torch.isfinite(out.log_prob).all()
        assert scheduler.step_index == NUM_STEPS

        # The trainer's view: one step per sample, each at a different point of the stored trajectory.
        steps = [2, 7, 5]

        def pick(tensors, offset=0):
            return torch.stack([tensors[k + offset][i] for i, k in enumerate(steps)])

        log_prob = scheduler.sample_previous_step(
            pick(trajectory), pick(velocities), timestep=scheduler.timesteps[steps],
            prev_sample=pick(trajectory, 1), sde_type=sde_type,
        )[1]
        torch.testing.assert_close(log_prob, pick(log_probs), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the noise-level floor


@pytest.mark.parametrize("sde_type", ["sde", "dance_sde"])
def test_a_noise_level_below_the_floor_is_refused_where_the_log_prob_would_be_minus_inf(sde_type):
    scheduler = qwen_image_scheduler(num_steps=50, image_seq_len=4096)
    sample, model_output = torch.randn(2, 16, 8), torch.randn(2, 16, 8)
    t = scheduler.timesteps[0].expand(2)
    with pytest.raises(ValueError, match=rf"^`noise_level` must be 0 \(the deterministic Euler step\) or >= 1e-06 "
                                         rf"for sde_type='{sde_type}': .*got 1e-30$"):  # fmt: skip
        scheduler.sample_previous_step(sample, model_output, t, noise_level=1e-30, sde_type=sde_type, prev_sample=sample)


@pytest.mark.parametrize("sde_type", ["sde", "dance_sde"])
def test_at_the_floor_a_scored_sample_has_a_finite_log_prob_at_every_step(sde_type):
    scheduler = qwen_image_scheduler(num_steps=50, image_seq_len=4096)
    generator = torch.Generator().manual_seed(0)
    sample, model_output = torch.randn(2, 16, 8, generator=generator), torch.randn(2, 16, 8, generator=generator)
    for t in scheduler.timesteps:
        drawn, _, _, _ = scheduler.sample_previous_step(
            sample, model_output, t.expand(2), noise_level=0.7, sde_type=sde_type, generator=generator
        )
        _, log_prob, _, _ = scheduler.sample_previous_step(
            sample, model_output, t.expand(2), noise_level=MIN_NOISE_LEVEL, sde_type=sde_type, prev_sample=drawn
        )
        assert torch.isfinite(log_prob).all(), (t, log_prob)


def test_cps_scores_without_a_variance_so_any_small_noise_level_is_taken():
    scheduler = qwen_image_scheduler(num_steps=4, image_seq_len=16)
    sample = torch.randn(2, 16, 8)
    _, log_prob, _, _ = scheduler.sample_previous_step(
        sample, torch.randn(2, 16, 8), scheduler.timesteps[0].expand(2), noise_level=1e-30, sde_type="cps",
        prev_sample=sample,
    )  # fmt: skip
    assert torch.isfinite(log_prob).all()
