"""timm's own model tests (tests/test_models.py of the installed timm's source distribution) on
models that fastnn.fuse fuses as timm creates them: forward, backward, default configs, features,
forward_intermediates, FX, TorchScript, torch.compile, pruning, ... Every model those tests make
goes through fastnn.fuse (timm.create_model is wrapped), and the end of the run prints how many
modules each model had fused and how many fused ops ran.

Not part of the pytest suite: timm imports torchvision, whose PyPI wheel loads only beside the CUDA
build of torch, and the run takes minutes. Run it by hand where timm imports:
    python tests/run_timm_model_tests.py [pytest arguments]
Tests that download pretrained weights (test_model_inference, *pretrained*) are left out: they need
the Hugging Face hub.
"""
import collections
import os
import subprocess
import sys
import tarfile
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

# models with timm Mlp, GluMlp or SwiGLU blocks (torch's or timm's activation classes), across the
# families: plain, relative-position and register ViTs, Mixer / gMixer / ResMLP, EVA-02 (SwiGLU),
# Swin, CaiT, CoaT, VOLO, MobileViT, Hiera, XCiT, CrossViT, Twins, Sequencer, EdgeNeXt, MViTv2,
# DaViT, NesT, FocalNet, PoolFormer, EfficientFormer, TNT, CSATv2, ConvNeXt, MaxViT, CoAtNet, GCViT
MODELS = """test_vit test_vit2 test_vit3 test_vit4 test_vit_relpos test_convnext test_convnext2 test_convnext3
test_maxvit test_coatnet test_mambaout mixer_s16_224 gmixer_12_224 resmlp_12_224 eva02_tiny_patch14_224
deit_tiny_patch16_224 swin_tiny_patch4_window7_224 convnext_atto cait_xxs24_224 coat_tiny volo_d1_224
mobilevit_xxs hiera_tiny_224 gcvit_xxtiny xcit_nano_12_p16_224 crossvit_tiny_240 twins_svt_small sequencer2d_s
edgenext_xx_small mvitv2_tiny davit_tiny nest_tiny focalnet_tiny_srf poolformer_s12 efficientformer_l1
tnt_s_patch16_224 vit_little_patch16_reg1_gap_256 csatv2""".split()


def _timm_tests():
    """The tests folder of the installed timm's source distribution (pip download, cached in the
    temp folder)."""
    import timm

    root = os.path.join(tempfile.gettempdir(), f"fastnn-timm-{timm.__version__}-tests")
    tests = os.path.join(root, f"timm-{timm.__version__}", "tests")
    if not os.path.exists(os.path.join(tests, "test_models.py")):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", root,
                        f"timm=={timm.__version__}"], check=True)
        with tarfile.open(os.path.join(root, f"timm-{timm.__version__}.tar.gz")) as tar:
            members = [m for m in tar.getmembers() if "/tests/" in m.name]
            tar.extractall(root, members=members, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return tests


# ---- the pytest plugin (this module, loaded by name in the run that main starts) ----------------
FUSED_MODULES = collections.Counter()
CALLS = collections.Counter()


def pytest_configure(config):
    import timm
    import timm.models
    import torch

    import fastnn
    sys.path.insert(0, HERE)
    from fused_calls import counting_replacements

    create = timm.create_model

    def create_model(*args, **kwargs):
        model = fastnn.fuse(create(*args, **kwargs))
        FUSED_MODULES[args[0] if args else kwargs.get("model_name")] += sum(r.fused for r in model.fastnn_fuse_report)
        return model

    def uncounted_while_compiling(counted, original):
        # (a count taken while torch.compile traces would become a guard on the Counter: a recompile)
        def call(*args, **kwargs):
            return (original if torch.compiler.is_compiling() else counted)(*args, **kwargs)
        return call

    timm.create_model = timm.models.create_model = create_model
    for module, name, counted in counting_replacements(CALLS):
        setattr(module, name, uncounted_while_compiling(counted, getattr(module, name)))


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"fastnn: modules fused per model created: {dict(FUSED_MODULES)}")
    terminalreporter.write_line(f"fastnn: fused op calls: {dict(CALLS)}")


def main(args):
    import timm
    import torch

    import fastnn

    tests = _timm_tests()
    print(f"timm {timm.__version__}, torch {torch.__version__}, fastnn {fastnn.__version__}; {len(MODELS)} models")
    selection = f"({' or '.join(MODELS)}) and not pretrained and not test_model_inference"
    sys.path.insert(0, HERE)
    os.chdir(os.path.dirname(tests))
    return pytest.main(["-q", "-p", "no:cacheprovider", "-p", "run_timm_model_tests", "tests/test_models.py",
                        "-k", selection, *args])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
