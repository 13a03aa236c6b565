"""Scoring a user's own episode folder: support/<class>/*.png, query/<class>/*.png."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.data import draw_shape

from sharebone.data.omniglot import PREPROCESSING
from sharebone.evaluation.folder import EpisodeFolderError, load_episode_folder


def make_episode(root: Path) -> Path:
    for i in range(2):
        draw_shape(root / "support" / "bar" / f"{i}.png", "bar", shift=3 * i)
        draw_shape(root / "support" / "ring" / f"{i}.png", "ring", shift=3 * i)
    draw_shape(root / "query" / "bar" / "q.png", "bar", shift=5)
    draw_shape(root / "query" / "ring" / "q.png", "ring", shift=-4)
    draw_shape(root / "query" / "unknown.png", "ring", shift=2)
    return root


def test_folder_becomes_one_episode_with_training_preprocessing(tmp_path):
    loaded = load_episode_folder(make_episode(tmp_path), image_size=28, **PREPROCESSING)
    ep = loaded.episode
    assert loaded.class_names == ["bar", "ring"]
    assert ep.support.shape == (1, 4, 1, 28, 28) and ep.query.shape == (1, 3, 1, 28, 28)
    assert ep.support_labels.tolist() == [[0, 0, 1, 1]]
    assert loaded.query_targets.tolist() == [-1, 0, 1]  # unlabelled first, then per class
    # Strokes bright on a dark background, as Omniglot is fed to the backbone.
    assert ep.support.float().mean() < 128 and ep.support.max() > 200


def test_protonet_classifies_a_clear_folder_episode(tmp_path):
    from sharebone.regimes import ProtoNet

    loaded = load_episode_folder(make_episode(tmp_path), image_size=28)
    model = ProtoNet({"name": "mlp", "in_features": 784, "hidden": []})  # raw pixels
    logits = model.predict_episode(loaded.episode.to_float())[0]
    assert logits.argmax(-1).tolist() == [1, 0, 1]


def test_query_class_without_support_is_refused(tmp_path):
    root = make_episode(tmp_path)
    draw_shape(root / "query" / "star" / "q.png", "bar")
    with pytest.raises(EpisodeFolderError, match="Query class 'star' has no support examples"):
        load_episode_folder(root, image_size=28)


def test_empty_support_class_is_refused(tmp_path):
    root = make_episode(tmp_path)
    (root / "support" / "empty").mkdir()
    with pytest.raises(EpisodeFolderError, match="Support class 'empty'.*has no images"):
        load_episode_folder(root, image_size=28)


def test_missing_query_folder_explains_the_layout(tmp_path):
    draw_shape(tmp_path / "support" / "a" / "0.png", "bar")
    with pytest.raises(EpisodeFolderError, match="query is missing.*support/<class>/\\*.png"):
        load_episode_folder(tmp_path, image_size=28)


def test_a_single_class_is_not_an_episode(tmp_path):
    draw_shape(tmp_path / "support" / "a" / "0.png", "bar")
    draw_shape(tmp_path / "query" / "a" / "0.png", "bar")
    with pytest.raises(EpisodeFolderError, match="needs at least 2"):
        load_episode_folder(tmp_path, image_size=28)


def test_omniglot_tasks_read_an_episode_folder_inverted_and_nothing_else_does(tmp_path):
    import torch

    from sharebone.data.image_folder import ImageFolderTasks
    from sharebone.data.multitask import OmniglotAlphabets
    from sharebone.data.tasks import OmniglotTasks

    root = make_episode(tmp_path)
    as_drawn = load_episode_folder(root, image_size=28).episode.support
    assert as_drawn.float().mean() > 128  # white background: load_image inverts nothing
    for family in (OmniglotTasks, OmniglotAlphabets):
        settings = family.preprocessing({})
        inverted = load_episode_folder(root, image_size=28, **settings).episode.support
        assert torch.equal(inverted, 255 - as_drawn), family.__name__
    photos = ImageFolderTasks.preprocessing({"channels": 1})
    photos.pop("normalize")
    assert torch.equal(load_episode_folder(root, image_size=28, **photos).episode.support,
                       as_drawn)
