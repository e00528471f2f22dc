"""The on-device CIFAR augmentation (SPEC 3.10) and the two data pipelines agreeing."""

import numpy as np
import pytest
import torch

from data import TensorTrainStream, build_data, epoch_order
from data.augment import Normalizer, crop_flip
from data.cifar import CIFAR_MEAN, CIFAR_STD, load_cifar10
from training_params import parse

SPEC_MEAN = (0.4914, 0.4822, 0.4465)
SPEC_STD = (0.2023, 0.1994, 0.2010)
SIZE, PAD = 32, 4


def coordinate_images(count):
    """uint8 [N, 3, 32, 32] whose pixels say where they come from: channel 0 holds row + 1,
    channel 1 column + 1 (0 only ever appears in the zero padding), channel 2 a per-image value."""
    rows = torch.arange(1, SIZE + 1).view(SIZE, 1).expand(SIZE, SIZE)
    cols = torch.arange(1, SIZE + 1).view(1, SIZE).expand(SIZE, SIZE)
    images = torch.empty(count, 3, SIZE, SIZE, dtype=torch.uint8)
    images[:, 0], images[:, 1] = rows, cols
    images[:, 2] = (torch.arange(count) % 200 + 1).view(count, 1, 1)
    return images


def to_uint8(normalized):
    """Undo the normalisation (exact up to float rounding, so round to the pixel value)."""
    mean = torch.tensor(SPEC_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(SPEC_STD).view(1, 3, 1, 1)
    return torch.round((normalized.float() * std + mean) * 255).to(torch.uint8)


def read_crop(image):
    """(row offset, column offset, flipped) of a crop of a coordinate image, read off the
    pixel in the middle (always inside the source image for offsets 0..8)."""
    row_value, col_value, next_col = int(image[0, 16, 16]), int(image[1, 16, 16]), int(image[1, 16, 17])
    flipped = next_col < col_value
    # Output pixel (16, 16) reads padded row r0 + 16 = source row r0 + 12 (value r0 + 13), and
    # padded column c0 + 16 (value c0 + 13) or, flipped, c0 + 31 - 16 (value c0 + 12).
    return row_value - 13, col_value - (12 if flipped else 13), flipped


def expected_crop(source, row, col, flipped):
    padded = np.pad(source.numpy(), ((0, 0), (PAD, PAD), (PAD, PAD)))
    window = padded[:, row:row + SIZE, col:col + SIZE]
    return torch.from_numpy(np.ascontiguousarray(window[:, :, ::-1] if flipped else window))


def epoch_crops(count, seed=0, epoch=0, batch_size=500, memory_format=torch.contiguous_format):
    images = coordinate_images(count)
    stream = TensorTrainStream(images, torch.arange(count), batch_size, seed, 0, 1, memory_format)
    outputs, labels = zip(*stream.batches(epoch))
    return images, torch.cat(outputs), torch.cat(labels)


def test_normalisation_constants_are_those_of_spec():
    assert CIFAR_MEAN == SPEC_MEAN and CIFAR_STD == SPEC_STD


def test_normalisation_maps_pixel_values_as_totensor_and_normalize():
    pixels = torch.tensor([0, 1, 128, 254, 255], dtype=torch.uint8)
    images = pixels.view(1, 1, 1, 5).expand(1, 3, 1, 5).contiguous()
    out = Normalizer(SPEC_MEAN, SPEC_STD, torch.device("cpu"))(images).double()
    for channel in range(3):
        expected = (pixels.double() / 255 - SPEC_MEAN[channel]) / SPEC_STD[channel]
        assert torch.allclose(out[0, channel, 0], expected, atol=1e-6)
    # Normalised statistics of a uniform pixel distribution, from the formula by hand.
    assert out[0, 0, 0, 0].item() == pytest.approx(-0.4914 / 0.2023, abs=1e-6)
    assert out[0, 2, 0, -1].item() == pytest.approx((1 - 0.4465) / 0.2010, abs=1e-6)


def test_normalisation_is_bit_identical_to_torchvision():
    import torchvision.transforms as T
    from PIL import Image

    image = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    reference = T.Compose([T.ToTensor(), T.Normalize(SPEC_MEAN, SPEC_STD)])(Image.fromarray(image))
    ours = Normalizer(SPEC_MEAN, SPEC_STD, torch.device("cpu"))(torch.from_numpy(image).permute(2, 0, 1)[None])
    assert torch.equal(ours[0], reference)


def test_every_crop_is_the_window_of_the_zero_padded_image_at_its_offset():
    images, outputs, labels = epoch_crops(600)
    assert outputs.shape == (600, 3, SIZE, SIZE) and outputs.dtype == torch.float32
    pixels = to_uint8(outputs)
    for image, index in zip(pixels, labels.tolist()):
        row, col, flipped = read_crop(image)
        assert 0 <= row <= 2 * PAD and 0 <= col <= 2 * PAD
        assert torch.equal(image, expected_crop(images[index], row, col, flipped))


def test_offsets_are_uniform_over_0_to_8_and_flips_happen_half_the_time():
    count = 3600
    _, outputs, _ = epoch_crops(count, seed=3)
    crops = [read_crop(image) for image in to_uint8(outputs)]
    rows = np.bincount([row for row, _, _ in crops], minlength=9)
    cols = np.bincount([col for _, col, _ in crops], minlength=9)
    flips = sum(flipped for _, _, flipped in crops)
    # Binomial bounds at 5 standard deviations (seeded draws, so the test is deterministic).
    expected, spread = count / 9, 5 * np.sqrt(count * (1 / 9) * (8 / 9))
    assert len(rows) == len(cols) == 9
    assert all(abs(n - expected) < spread for n in rows), rows
    assert all(abs(n - expected) < spread for n in cols), cols
    assert abs(flips - count / 2) < 5 * np.sqrt(count / 4), flips
    assert 0 < flips < count


def test_crop_flip_of_a_batch_matches_the_padded_window():
    images = coordinate_images(4)
    offsets = torch.tensor([[0, 0], [8, 8], [3, 5], [8, 0]])
    flips = torch.tensor([False, True, True, False])
    out = crop_flip(images, offsets, flips)
    for image, source, (row, col), flipped in zip(out, images, offsets.tolist(), flips.tolist()):
        assert torch.equal(image, expected_crop(source, row, col, flipped))
    # The corners of offset (0, 0) and (8, 8) lie in the zero padding.
    assert out[0, :, :PAD, :].eq(0).all() and out[1, :, -PAD:, :].eq(0).all()


def test_train_order_is_the_distributed_sampler_order_and_resumes_mid_epoch():
    _, outputs, labels = epoch_crops(100, seed=5, epoch=2, batch_size=16)
    assert labels.tolist() == epoch_order(100, 2, 5, 0, 1)
    images = coordinate_images(100)
    stream = TensorTrainStream(images, torch.arange(100), 16, 5, 0, 1, torch.contiguous_format)
    tail = list(stream.batches(2, start_step=3))
    assert len(tail) == 7 - 3
    assert torch.equal(torch.cat([x for x, _ in tail]), outputs[3 * 16:])
    assert torch.equal(torch.cat([y for _, y in tail]), labels[3 * 16:])


def test_channels_last_gives_the_same_values_in_channels_last_layout():
    _, plain, _ = epoch_crops(64)
    _, last, _ = epoch_crops(64, memory_format=torch.channels_last)
    assert last.is_contiguous(memory_format=torch.channels_last)
    assert plain.is_contiguous()
    assert torch.equal(plain, last)


def test_augmentation_draws_differ_between_epochs_and_seeds():
    _, first, _ = epoch_crops(200, epoch=0)
    _, second, _ = epoch_crops(200, epoch=1)
    _, other_seed, _ = epoch_crops(200, seed=1)
    assert not torch.equal(first, second) and not torch.equal(first, other_seed)


def pipeline(tiny_cifar, name, batch_size=16):
    config, _ = parse("unstructured_sparsity", ["--data_dir", tiny_cifar, "--batch_size", str(batch_size),
                                                "--data_pipeline", name, "--num_workers", "0",
                                                "--save_dir", "unused"])
    return config, build_data(config, torch.device("cpu"))


def candidate_crops(source):
    """All 9 x 9 x 2 crops of a uint8 [3, 32, 32] image."""
    return torch.stack([expected_crop(source, row, col, flipped)
                        for row in range(9) for col in range(9) for flipped in (False, True)])


def test_tensor_and_dataloader_pipelines_agree(tiny_cifar):
    config, tensor = pipeline(tiny_cifar, "tensor")
    _, loader = pipeline(tiny_cifar, "dataloader")
    # Identical test batches (values and order).
    tensor_test, loader_test = list(tensor.test.batches()), list(loader.test.batches())
    assert len(tensor_test) == len(loader_test) == 3
    for (x1, y1), (x2, y2) in zip(tensor_test, loader_test):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # The same training order; each image a crop/flip of the same source image.
    images, _ = load_cifar10(tiny_cifar, True, None, config.seed)
    sources = torch.from_numpy(images).permute(0, 3, 1, 2)
    order = tensor.train.order(1, 0)
    assert order == loader.train.order(1, 0)
    for stream in (tensor.train, loader.train):
        batches = list(stream.batches(1))
        assert [len(y) for _, y in batches] == [16] * 5
        pixels = to_uint8(torch.cat([x for x, _ in batches]))
        labels = torch.cat([y for _, y in batches])
        assert labels.tolist() == [int(tensor.train.labels[i]) for i in order]
        for image, index in zip(pixels, order):
            assert (candidate_crops(sources[index]) == image).flatten(1).all(1).any(), index
