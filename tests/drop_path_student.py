"""``python drop_path_student.py ARGS``: the synthdistill CLI with one more timm model registered,
``test_vit_drop_path`` (timm's ``test_vit`` with stochastic depth 0.1, as TinyViT-11M/21M have), so
that a multi-process run draws random drop-path masks on every rank. Used under torchrun by
test_train_wiring.py."""

import sys

from timm.models import register_model
from timm.models.vision_transformer import test_vit

from synthdistill.cli import main


@register_model
def test_vit_drop_path(pretrained: bool = False, **kwargs):
    return test_vit(pretrained=False, drop_path_rate=0.1, **kwargs)


if __name__ == "__main__":
    main(sys.argv[1:])
