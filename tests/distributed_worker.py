"""`python -m distributed_worker PROFILE HOW`: a 2-process run where something goes wrong on purpose.

HOW is `raise` (process 1 raises an error at its third step), `exit` (process 0 vanishes there, as if killed;
both with the loss weighting `fails_on_purpose`) or `break` (with model.loader `breaks_img1`, process 1
breaks img1.png of the dataset when it loads the VAE, after the scan). Without a launcher's environment it
starts itself twice through anima-train's launcher (as `anima-train run` does); each worker trains with the
built-in plugins plus those.
"""

import os
import sys
from pathlib import Path

from anima_plugins.anima_loader import AnimaLoader

from anima_core.config import profile_from_dict
from anima_core.config.load import read_profile_data
from anima_core.hookspecs import hookimpl
from anima_core.plugins import build_plugins
from anima_core.training.distributed import launch_workers, under_launcher
from anima_core.training.trainer import Trainer


class FailingWeighting:
    def __init__(self, how: str):
        self.how, self.calls = how, 0

    @hookimpl
    def register_loss_weightings(self, register):
        def weighting(sigmas):
            self.calls += 1
            if self.calls == 3 and self.how == "raise" and os.environ["RANK"] == "1":
                raise ValueError("weighting failed on purpose")
            if self.calls == 3 and self.how == "exit" and os.environ["RANK"] == "0":
                os._exit(3)
            return sigmas * 0 + 1

        register("fails_on_purpose", weighting)


class BreaksImg1:
    """The "anima" loader, but process 1 breaks img1.png of `train_data_dir` as it loads the VAE."""

    class Loader(AnimaLoader):
        def load_vae(self, model_cfg, *, dtype, device):
            if os.environ["RANK"] == "1":
                image = next(Path(os.environ["ANIMA_TEST_DATA"]).rglob("img1.png"))
                image.write_bytes(b"not an image any more")
            return super().load_vae(model_cfg, dtype=dtype, device=device)

    @hookimpl
    def register_model_loaders(self, register):
        register("breaks_img1", self.Loader())


def main(profile_path: str, how: str) -> int:
    plugins = build_plugins(extra=(FailingWeighting(how), BreaksImg1()))
    path = Path(profile_path)
    profile = profile_from_dict(read_profile_data(path), source=str(path), base_dir=path.parent, plugins=plugins)
    os.environ["ANIMA_TEST_DATA"] = str(profile.dataset.train_data_dir)
    if not under_launcher():
        run_dir = profile.saving.output_dir / "runs" / profile.logging.run_name
        return launch_workers(2, [profile_path, how], run_dir=run_dir, threads=1,
                              command=[sys.executable, "-m", "distributed_worker"])
    Trainer(profile, plugins).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
