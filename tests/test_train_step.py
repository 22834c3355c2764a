"""One optimizer step: loss normalisation over accumulated micro-batches, non-finite skipping."""

import torch

from lmu_asr.data import Batch, collate
from lmu_asr.distributed import DistEnv
from lmu_asr.features import FeatureConfig
from lmu_asr.model import SpeechRecognizer
from lmu_asr.speech_dataset import Item
from lmu_asr.train import train_step
from tests.test_model import preset


def items(seed: int) -> list[Item]:
    g = torch.Generator().manual_seed(seed)
    return [
        Item(f"u{seed}-{i}", torch.randn(8000 + 2000 * i, generator=g) * 0.1,
             torch.randint(3, 29, (4 + i,), generator=g))
        for i in range(2)
    ]  # fmt: skip


def setup(seed: int = 0):
    torch.manual_seed(seed)
    features = FeatureConfig(normalize="utterance", freq_masks=0, time_masks=0)
    model = SpeechRecognizer(preset("lmu_tiny"), features)
    # plain SGD: the update is the gradient itself (Adam's first step is ~sign(g), which
    # turns rounding noise in near-zero gradients into full-size differences)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt, torch.amp.GradScaler("cpu", enabled=False)


def step(model, opt, scaler, group: list[Batch]):
    return train_step(model, group, opt, scaler, 5.0, torch.float32, DistEnv())


def test_accumulated_micro_batches_equal_one_batch():
    """The loss is summed over the whole step and divided by its token count, so splitting a
    batch into micro-batches does not change the update."""
    a, b = items(1), items(2)
    model1, opt1, scaler1 = setup()
    loss1, gnorm1, ok1 = step(model1, opt1, scaler1, [collate(a), collate(b)])
    model2, opt2, scaler2 = setup()
    loss2, gnorm2, ok2 = step(model2, opt2, scaler2, [collate(a + b)])
    assert ok1 and ok2
    assert abs(loss1 - loss2) < 1e-5 and abs(gnorm1 - gnorm2) < 1e-4
    for p1, p2 in zip(model1.parameters(), model2.parameters(), strict=True):
        torch.testing.assert_close(p1, p2, atol=1e-6, rtol=1e-5)


def test_non_finite_step_is_skipped_and_leaves_the_weights_alone():
    model, opt, scaler = setup()
    batch = collate(items(3))
    batch.wav[0, 100] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    loss, gnorm, ok = step(model, opt, scaler, [batch])
    assert not ok
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)
    assert all(p.grad is None for p in model.parameters())
    # the next, finite step trains normally
    _, _, ok = step(model, opt, scaler, [collate(items(4))])
    assert ok and any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
