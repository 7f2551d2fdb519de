"""Model options resolved without open_clip: the tag table read from the installed open_clip file
must be open_clip's own, entry for entry, and reading it must import neither torch nor open_clip."""
import json
import subprocess
import sys


def test_detached_tag_table_equals_open_clips(monkeypatch):
    import open_clip
    code = ("import sys, json\n"
            "from eclip.model.source import pretrained_table\n"
            "t = pretrained_table()\n"
            "out = {f'{m}:{tag}': t.get_pretrained_cfg(m, tag) for m, tag in t.list_pretrained()}\n"
            "heavy = [m for m in ('torch', 'open_clip', 'huggingface_hub', 'safetensors.torch') if m in sys.modules]\n"
            "print(json.dumps({'table': out, 'heavy': heavy, 'file': t.__file__}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout)
    assert got["heavy"] == []
    assert got["file"] == open_clip.pretrained.__file__
    want = {f"{m}:{tag}": json.loads(json.dumps(open_clip.get_pretrained_cfg(m, tag)))
            for m, tag in open_clip.list_pretrained()}
    assert len(want) > 100 and got["table"] == want


def test_builtin_configs_are_open_clips():
    import open_clip

    from eclip.model.source import builtin_config_file, open_clip_dir
    names = sorted(p.stem for p in (open_clip_dir() / "model_configs").glob("*.json"))
    assert set(names) <= set(open_clip.list_models()) and len(names) > 50
    for name in ("ViT-B-32", "ViT-L-14", "RN50", names[0], names[-1]):
        assert builtin_config_file(name) == open_clip.get_model_config(name)
    assert builtin_config_file("NoSuchNet-9") is None and open_clip.get_model_config("NoSuchNet-9") is None
