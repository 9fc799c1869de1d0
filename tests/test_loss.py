"""dreambooth_loss: instance MSE + prior_loss_weight * class MSE, with optional min-SNR weighting."""

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from train_dreambooth_lora_ssd1b import dreambooth_loss as keyword_loss

SHAPE = (4, 8, 8)  # latent channels, height, width


def dreambooth_loss(prediction, target, timesteps, scheduler, with_prior, prior_loss_weight, snr_gamma):
    """The trainer's loss with its settings in a fixed order, as these tables of cases give them."""
    return keyword_loss(prediction, target, timesteps, scheduler, with_prior=with_prior,
                        prior_loss_weight=prior_loss_weight, snr_gamma=snr_gamma)


def sdxl_scheduler(prediction_type="epsilon"):
    """SDXL's (and SSD-1B's) training betas."""
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         num_train_timesteps=1000, prediction_type=prediction_type)


def filled(*values):
    """A batch whose sample i is the constant values[i]."""
    return torch.stack([torch.full(SHAPE, float(v)) for v in values])


def mse(a, b):
    return ((a.double() - b.double()) ** 2).mean().item()


def per_sample_mse(a, b):
    return ((a.double() - b.double()) ** 2).mean(dim=(1, 2, 3))


TIMESTEPS = torch.tensor([10, 500, 100, 999])


# ----------------------------------------------------------------------------------------------------------
# Prior preservation: the class half is the second half of the batch
# ----------------------------------------------------------------------------------------------------------


def test_prior_loss_is_instance_mse_plus_weight_times_class_mse_of_second_half():
    # instance half (samples 0, 1): errors 1 and 2 -> MSE 2.5; class half (2, 3): errors 3 and 5 -> MSE 17
    prediction = filled(0, 0, 0, 0)
    target = filled(1, 2, 3, 5)
    loss = dreambooth_loss(prediction, target, TIMESTEPS, sdxl_scheduler(), with_prior=True,
                           prior_loss_weight=0.25, snr_gamma=None)
    assert loss.item() == pytest.approx(2.5 + 0.25 * 17.0)
    assert loss.item() != pytest.approx(17.0 + 0.25 * 2.5)  # the halves swapped would give this


def test_prior_loss_matches_a_hand_computation_on_random_tensors():
    generator = torch.Generator().manual_seed(0)
    prediction = torch.randn(6, *SHAPE, generator=generator)
    target = torch.randn(6, *SHAPE, generator=generator)
    target[3:] *= 3  # class half clearly worse than the instance half
    instance_mse, class_mse = mse(prediction[:3], target[:3]), mse(prediction[3:], target[3:])
    assert class_mse > 2 * instance_mse

    for weight in [0.0, 0.5, 1.0, 2.0]:
        loss = dreambooth_loss(prediction, target, torch.zeros(6, dtype=torch.long), sdxl_scheduler(), True,
                               weight, None)
        assert loss.item() == pytest.approx(instance_mse + weight * class_mse, rel=1e-5)


def test_changing_only_the_class_predictions_changes_the_loss_by_weight_times_the_class_mse_change():
    weight = 0.3
    target = filled(1, 1, 1, 1)
    before = filled(0, 0, 1, 1)  # instance MSE 1, class MSE 0
    after = before.clone()
    after[2:] = 4.0  # class MSE 9; the instance half is untouched
    args = (TIMESTEPS, sdxl_scheduler(), True, weight, None)
    change = dreambooth_loss(after, target, *args) - dreambooth_loss(before, target, *args)
    assert change.item() == pytest.approx(weight * 9.0)

    # the same change made to the instance half counts in full
    after_instance = before.clone()
    after_instance[:2] = 4.0  # instance MSE 1 -> 9
    change = dreambooth_loss(after_instance, target, *args) - dreambooth_loss(before, target, *args)
    assert change.item() == pytest.approx(8.0)


def test_prior_loss_weight_zero_ignores_the_class_half():
    target = filled(2, 2, 2, 2)
    good_class = filled(1, 1, 2, 2)
    bad_class = filled(1, 1, 100, -50)
    args = (TIMESTEPS, sdxl_scheduler(), True, 0.0, None)
    assert dreambooth_loss(good_class, target, *args).item() == pytest.approx(1.0)
    assert dreambooth_loss(bad_class, target, *args).item() == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------------------
# Without prior preservation
# ----------------------------------------------------------------------------------------------------------


def test_without_prior_the_loss_is_the_plain_mean_mse():
    generator = torch.Generator().manual_seed(1)
    prediction = torch.randn(3, *SHAPE, generator=generator)
    target = torch.randn(3, *SHAPE, generator=generator)
    loss = dreambooth_loss(prediction, target, torch.tensor([1, 2, 3]), sdxl_scheduler(), False, 1.0, None)
    assert loss.item() == pytest.approx(mse(prediction, target), rel=1e-6)
    assert loss.item() == pytest.approx(torch.nn.functional.mse_loss(prediction, target).item(), rel=1e-6)
    assert loss.dim() == 0


def test_without_prior_the_weight_is_not_applied():
    prediction, target = filled(0, 0), filled(1, 3)  # per-sample MSE 1 and 9
    for weight in [0.0, 1.0, 5.0]:
        loss = dreambooth_loss(prediction, target, torch.tensor([0, 0]), sdxl_scheduler(), False, weight, None)
        assert loss.item() == pytest.approx(5.0)


# ----------------------------------------------------------------------------------------------------------
# min-SNR weighting
# ----------------------------------------------------------------------------------------------------------


def random_batch(n, seed=2):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=generator), torch.randn(n, *SHAPE, generator=generator)


def test_snr_gamma_weights_each_sample_by_min_snr_gamma_over_snr_for_epsilon():
    gamma = 5.0
    scheduler = sdxl_scheduler("epsilon")
    prediction, target = random_batch(4)
    snr = compute_snr(scheduler, TIMESTEPS).double()
    assert (snr > gamma).any() and (snr < gamma).any()  # both sides of the clamp are exercised

    weights = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) / snr
    expected = (per_sample_mse(prediction, target) * weights).mean().item()
    loss = dreambooth_loss(prediction, target, TIMESTEPS, scheduler, False, 1.0, gamma)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert loss.item() != pytest.approx(mse(prediction, target), rel=1e-3)  # the weighting does something


def test_snr_gamma_weights_each_sample_by_min_snr_gamma_over_snr_plus_one_for_v_prediction():
    gamma = 5.0
    scheduler = sdxl_scheduler("v_prediction")
    prediction, target = random_batch(4)
    snr = compute_snr(scheduler, TIMESTEPS).double()
    weights = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) / (snr + 1)
    expected = (per_sample_mse(prediction, target) * weights).mean().item()
    loss = dreambooth_loss(prediction, target, TIMESTEPS, scheduler, False, 1.0, gamma)
    assert loss.item() == pytest.approx(expected, rel=1e-5)

    epsilon_loss = dreambooth_loss(prediction, target, TIMESTEPS, sdxl_scheduler("epsilon"), False, 1.0, gamma)
    assert loss.item() != pytest.approx(epsilon_loss.item(), rel=1e-3)  # v-prediction has its own weights


def test_snr_weight_is_one_for_epsilon_where_snr_is_below_gamma():
    gamma = 5.0
    scheduler = sdxl_scheduler("epsilon")
    noisy = torch.tensor([200, 400, 700, 999])  # high noise: SNR 3.06, 0.74, 0.09, 0.005
    assert (compute_snr(scheduler, noisy) < gamma).all()
    prediction, target = random_batch(4)
    for i in range(4):
        one = dreambooth_loss(prediction[i:i + 1], target[i:i + 1], noisy[i:i + 1], scheduler, False, 1.0, gamma)
        assert one.item() == pytest.approx(mse(prediction[i], target[i]), rel=1e-6)
    loss = dreambooth_loss(prediction, target, noisy, scheduler, False, 1.0, gamma)
    assert loss.item() == pytest.approx(mse(prediction, target), rel=1e-6)


def test_snr_weight_is_gamma_over_snr_for_epsilon_where_snr_is_above_gamma():
    gamma = 5.0
    scheduler = sdxl_scheduler("epsilon")
    timestep = torch.tensor([0])  # SNR about 1175
    snr = compute_snr(scheduler, timestep).item()
    assert snr > 1000
    prediction, target = filled(0), filled(2)  # MSE 4
    loss = dreambooth_loss(prediction, target, timestep, scheduler, False, 1.0, gamma)
    assert loss.item() == pytest.approx(4.0 * gamma / snr, rel=1e-5)


def test_snr_weighting_with_prior_weights_every_sample_then_splits_the_halves():
    gamma, weight = 5.0, 0.5
    scheduler = sdxl_scheduler("epsilon")
    prediction, target = random_batch(4, seed=3)
    snr = compute_snr(scheduler, TIMESTEPS).double()
    weighted = per_sample_mse(prediction, target) * torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) / snr
    expected = weighted[:2].mean().item() + weight * weighted[2:].mean().item()
    loss = dreambooth_loss(prediction, target, TIMESTEPS, scheduler, True, weight, gamma)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Precision
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("snr_gamma", [None, 5.0])
@pytest.mark.parametrize("with_prior", [False, True])
def test_loss_is_computed_in_fp32_for_bf16_predictions(with_prior, snr_gamma):
    # bf16-rounded values whose errors are small next to the values: bf16 arithmetic (8 mantissa bits) on
    # the difference or the squares would be off by ~1e-3 relative; fp32 arithmetic agrees with fp64 to ~1e-7
    generator = torch.Generator().manual_seed(4)
    target16 = torch.randn(4, *SHAPE, generator=generator).bfloat16()
    prediction16 = (target16.float() + 0.05 * torch.randn(4, *SHAPE, generator=generator)).bfloat16()
    loss = dreambooth_loss(prediction16, target16, TIMESTEPS, sdxl_scheduler(), with_prior, 0.7, snr_gamma)
    assert loss.dtype == torch.float32

    # the reference, by hand in fp64 from the bf16 values: per-sample MSE, min-SNR weights, then the halves
    errors = ((prediction16.double() - target16.double()) ** 2).mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        alpha_bar = sdxl_scheduler().alphas_cumprod.double()[TIMESTEPS]
        snr = alpha_bar / (1 - alpha_bar)
        errors = errors * torch.clamp(snr, max=snr_gamma) / snr
    reference = errors[:2].mean() + 0.7 * errors[2:].mean() if with_prior else errors.mean()
    assert loss.item() == pytest.approx(reference.item(), rel=2e-6)


def test_loss_is_differentiable_with_respect_to_the_prediction():
    prediction, target = random_batch(4, seed=5)
    prediction.requires_grad_(True)
    loss = dreambooth_loss(prediction, target, TIMESTEPS, sdxl_scheduler(), True, 0.5, 5.0)
    loss.backward()
    assert prediction.grad is not None and torch.isfinite(prediction.grad).all()
    assert prediction.grad[:2].abs().sum() > 0 and prediction.grad[2:].abs().sum() > 0
