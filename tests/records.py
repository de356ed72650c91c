"""Typed records the tests build by hand, in one place: what the driver would have resolved for a run.

Importable from every test folder (pytest puts tests/ on sys.path for its conftest.py).
"""

from __future__ import annotations

from raytrain_cls.core.config import Resolved


def resolved_record(num_classes: int = 10, input_size: int = 16, **fields) -> Resolved:
    """A Resolved as the driver writes it for a small CPU run: ``num_classes`` classes named "0", "1", ...,
    square ``input_size`` RGB inputs normalised with 0.5/0.5; any field can be given instead."""
    values = dict(
        use_gpu=False,
        num_workers=1,
        lr=0.1,
        lr_rule="--lr",
        num_epochs=1,
        num_classes=num_classes,
        classes=[str(c) for c in range(num_classes)],
        train_samples=1437,
        val_samples=360,
        data_config=dict(
            input_size=[3, input_size, input_size],
            interpolation="bilinear",
            mean=[0.5] * 3,
            std=[0.5] * 3,
            crop_pct=1.0,
            crop_mode="center",
        ),
    )
    values.update(fields)
    return Resolved(**values)
