"""Adversarial attacks, AutoAttack and robust-accuracy evaluation (DESIGN §2 conventions, §6 sanity rules).

Conventions shared by every attack here (the pitfalls every attack library's users hit):

* inputs lie in [0, 1]; the model maps a batch (N, ...) to raw logits (N, K); labels are int64
  class indices (a binary score model is wrapped as two logits, e.g. ``models.BinaryLogits``);
* the model is put in ``eval()`` during the attack and every submodule's mode is restored
  afterwards, as is ``requires_grad`` of its parameters; gradients are taken w.r.t. the input
  only (``torch.autograd.grad``), so no parameter ``.grad`` is created or accumulated;
* one device boundary: inputs are moved to the model's device (or ``device=``), the work runs
  there in chunks of ``batch_size`` (default 256, see :mod:`.base`), results come back on the
  caller's device; the caller's tensors are never modified;
* a returned point is always inside the eps-ball (Linf or L2) around ``x`` AND inside [0, 1]
  (checked for every output of every attack);
* randomness comes from a ``torch.Generator`` on the compute device seeded from ``seed`` and the
  chunk index (same seed, same numbers on one device; CPU and CUDA streams differ);
* bad input (eps < 0 or NaN, unknown norm/loss, shape mismatch, labels out of range, x outside
  [0, 1]) raises ``ValueError``.

Modules: :mod:`._validation` (checks, ball, model mode), :mod:`.base` (the ``Attack`` classes),
:mod:`.gradient` (FGSM, PGD, multi-target PGD), :mod:`.apgd` (APGD-CE/DLR, APGD-T), :mod:`.fab`
(FAB-T), :mod:`.square` (Square), :mod:`.minimization` (CW-L2, DeepFool, minimal perturbation),
:mod:`.ensemble` (worst case over attacks, AutoAttack), :mod:`.evaluation` (robust accuracy, §6 rules).

References: Goodfellow et al. 2015 (FGSM); Madry et al. 2018 (PGD, {cite}`madry2018towards`);
Carlini & Wagner 2017 (CW-L2, {cite}`carlini2017towards`); Moosavi-Dezfooli et al. 2016 (DeepFool,
{cite}`moosavi2016deepfool`); Croce & Hein 2020 (APGD, AutoAttack), Croce & Hein 2020b (FAB),
Andriushchenko et al. 2020 (Square); Xu et al. 2020 Table 1 (the multi-target attack).
"""
from __future__ import annotations

from ._validation import frozen_eval
from ._validation import (  # noqa: F401  (private names used by marginlab.margins)
    _attack_mode,
    _check_eps,
    _check_eps_vec,
    _check_inputs,
    _check_int,
    _check_logits,
    _flat_norm,
    _norm_name,
    _predict,
    _prepare,
    _project,
    _random_start,
    assert_in_ball,
    in_ball,
    margin_gap,
    perturbation_norms,
)
from .apgd import APGD, APGDT, apgd, apgd_t, dlr_loss, targeted_dlr_loss
from .base import (
    DEFAULT_BATCH_SIZE,
    Attack,
    AttackResult,
    FixedEpsilonAttack,
    MinimizationAttack,
)
from .ensemble import (
    AutoAttack,
    EnsembleReport,
    auto_attack,
    auto_attack_report,
    worst_case,
)
from .evaluation import (
    accuracy_at_distances,
    assert_sanity,
    check_sanity,
    correct,
    robust_accuracy,
    sanity_report,
    worst_case_accuracy,
)
from .fab import FAB, fab, project_hyperplane_box
from .gradient import FGSM, PGD, MultiTargetPGD, fgsm, multi_target, pgd
from .minimization import (
    CarliniWagnerL2,
    DeepFool,
    cw_l2,
    deepfool,
    minimal_perturbation,
)
from .square import Square, square

__all__ = [  # noqa: RUF022 (grouped by kind, not sorted)
    # functional API (signatures relied on by the chapters and other modules)
    "margin_gap", "correct", "fgsm", "pgd", "cw_l2", "deepfool", "multi_target", "minimal_perturbation",
    "robust_accuracy", "accuracy_at_distances", "worst_case_accuracy", "perturbation_norms", "in_ball",
    "assert_in_ball", "sanity_report", "check_sanity", "assert_sanity",
    # AutoAttack and its members
    "apgd", "apgd_t", "fab", "square", "auto_attack", "auto_attack_report", "worst_case", "dlr_loss",
    "targeted_dlr_loss", "project_hyperplane_box",
    # attack objects
    "DEFAULT_BATCH_SIZE", "Attack", "AttackResult", "FixedEpsilonAttack", "MinimizationAttack", "FGSM", "PGD",
    "MultiTargetPGD", "CarliniWagnerL2", "DeepFool", "APGD", "APGDT", "FAB", "Square", "AutoAttack",
    "EnsembleReport",
    # the model-state context shared with marginlab.margins
    "frozen_eval",
]
