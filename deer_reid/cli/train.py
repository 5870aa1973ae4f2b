"""train body: fine-tune a body network; train viewpoint: the pose service's viewpoint classifier; train soup:
one network from several fine-tunes."""
from __future__ import annotations

import sys
from pathlib import Path

from deer_reid.cli.context import settings_for
from deer_reid.cli.output import keep_json, print_json
from deer_reid.cli.parsing import add_actions, add_command

KINDS = ("body", "viewpoint", "soup")


def register(commands) -> None:
    # no options of its own (its kinds have them, --home too): whatever follows `train` without naming a kind
    # goes to `train body` (default_to_body)
    train = commands.add_parser("train", help="fine-tune a body network, fit the viewpoint classifier, or average "
                                "fine-tunes into one network",
                                description="`deer-reid train DATA_DIR ...` is short for "
                                "`deer-reid train body DATA_DIR ...`")
    kinds = add_actions(train)
    tr = add_command(kinds, "body", cmd_train_body,
                     help="fine-tune a body network on labelled photos (metric learning)")
    tr.add_argument("data_dir", help="folder with metadata.csv (path, identity[, viewpoint, encounter])")
    tr.add_argument("--name", required=True, help="the new model's name (then --body-model NAME)")
    tr.add_argument("--base", default="efficientnet_lite0", help="efficientnet_lite0|1|2 (ImageNet weights)")
    tr.add_argument("--epochs", type=int, default=12)
    tr.add_argument("--input-size", type=int, default=224)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--holdout-identities", type=int, default=58,
                    help="identities neither trained on nor used to choose the epoch (eval reports on them)")
    tr.add_argument("--validation-identities", type=int, help="identities that choose the epoch (default 15)")
    tr.add_argument("--folds", type=int, default=0, metavar="K",
                    help="choose the epoch by K-fold cross-validation over every identity not held out, then train "
                    "on all of them (instead of --validation-identities)")
    tr.add_argument("--batch", type=int, default=32)
    tr.add_argument("--lr", type=float, default=3e-4)
    tr.add_argument("--average-from", type=int, default=0, help="average the weights of every epoch from this one "
                    "on (BN recomputed); kept only if it beats the best epoch on validation (0: off)")
    tr.add_argument("--erase", type=float, default=0.0, metavar="P",
                    help="random erasing: the share of training images with one rectangle of noise (0: off)")
    tr.add_argument("--distill", type=float, default=0.0, metavar="W",
                    help="weight of the cosine distance to the frozen ImageNet network's embedding (0: off)")
    tr.add_argument("--subcenters", type=int, default=3, metavar="K",
                    help="ArcFace centres per class (1: plain ArcFace)")
    tr.add_argument("--refit", action="store_true", help="once validation has chosen the epoch, train again on "
                    "training + validation identities for that many epochs (the holdout stays unseen)")
    tr.add_argument("--precision", choices=("auto", "fp32", "bf16"), help="default fp32 (bf16 measured no faster)")
    tr.add_argument("--overwrite", action="store_true", help="replace a trained model of the same name")
    tr.add_argument("--resume", action="store_true", help="continue from the last epoch's checkpoint")
    tr.add_argument("--json", help="write the model card here too")
    tr.add_argument("--quiet", action="store_true")

    tv = add_command(kinds, "viewpoint", cmd_train_viewpoint,
                     help="the pose service's viewpoint classifier, from labelled viewpoints")
    tv.add_argument("data_dir", help="folder with metadata.csv (path, identity, viewpoint[, encounter])")
    tv.add_argument("--name", default="viewpoint", help="the classifier's name in the model cache "
                    "(the pose service's DEER_POSE_VIEWPOINT_MODEL)")
    tv.add_argument("--backbone", default="efficientnet_lite0", help="body network whose features it reads")
    tv.add_argument("--seed", type=int, default=0)
    tv.add_argument("--holdout-identities", type=int, default=58, help="identities it never sees (its figures)")
    tv.add_argument("--validation-identities", type=int, default=15,
                    help="identities that choose its regularisation and its `unknown` threshold")
    tv.add_argument("--target-accuracy", type=float, default=0.95,
                    help="accuracy of answered predictions on validation; less confident answers are `unknown`")
    tv.add_argument("--overwrite", action="store_true")
    tv.add_argument("--json", help="write the card here too")
    tv.add_argument("--quiet", action="store_true")

    ts = add_command(kinds, "soup", cmd_train_soup, help="one network averaging the weights of fine-tunes of one "
                     "split, chosen greedily on validation")
    ts.add_argument("name", help="the soup's name in the model cache (then --body-model NAME)")
    ts.add_argument("--from", dest="ingredients", nargs="+", required=True, metavar="MODEL",
                    help="models trained by `deer-reid train` with the same base, input size, data and split")
    ts.add_argument("--overwrite", action="store_true", help="replace a model of the same name")
    ts.add_argument("--json", help="write the card here too")
    ts.add_argument("--quiet", action="store_true")


def default_to_body(argv: list[str]) -> list[str]:
    """`deer-reid train DATA_DIR ...` (the README's form) means `deer-reid train body DATA_DIR ...`: argparse has
    no default subcommand, so the word is put in wherever the one after `train` names none."""
    if argv[:1] == ["train"] and len(argv) > 1 and argv[1] not in (*KINDS, "-h", "--help"):
        return ["train", "body", *argv[1:]]
    return argv


def cmd_train_body(args) -> int:
    from deer_reid.evaluation.dataset import DatasetError
    from deer_reid.training.train import TrainConfig, TrainError, train

    settings = settings_for(args)
    in_use = _models_in_use(settings)
    validation = args.validation_identities if args.validation_identities is not None else 0 if args.folds else 15
    cfg = TrainConfig(name=args.name, base=args.base, epochs=args.epochs, input_size=args.input_size, seed=args.seed,
                      holdout_identities=args.holdout_identities, validation_identities=validation, folds=args.folds,
                      batch=args.batch, lr=args.lr, precision=args.precision or "fp32", overwrite=args.overwrite,
                      resume=args.resume, average_from=args.average_from, erase=args.erase,
                      refit=args.refit, distill=args.distill, subcenters=args.subcenters)
    try:
        card = train(Path(args.data_dir), cfg, settings, in_use=in_use, progress=not args.quiet)
    except (TrainError, DatasetError) as exc:
        print(f"deer-reid train: {exc}", file=sys.stderr)
        return 2
    keep_json(card, args.json)
    print_json({k: card[k] for k in ("name", "embedding_version", "selected_epoch", "validation", "seconds",
                                     "classes", "classes_by", "precision")})
    print(f"\nmodel {card['name']} is in {settings.model_cache / card['name']}; measure it on identities it never "
          f"learned: deer-reid eval {args.data_dir} --protocol loo --body-model {card['name']}")
    return 0


def cmd_train_soup(args) -> int:
    from deer_reid.evaluation.dataset import DatasetError
    from deer_reid.training.soup import soup
    from deer_reid.training.train import TrainError
    from shared.models import MissingWeights

    settings = settings_for(args)
    try:
        card = soup(args.name, args.ingredients, settings, overwrite=args.overwrite, in_use=_models_in_use(settings),
                    progress=not args.quiet)
    except (TrainError, DatasetError, MissingWeights) as exc:
        print(f"deer-reid train soup: {exc}", file=sys.stderr)
        return 2
    keep_json(card, args.json)
    print_json({k: card[k] for k in ("name", "embedding_version", "validation", "seconds")}
               | {"kept": card["soup"]["kept"]})
    print(f"\nmodel {card['name']} is in {settings.model_cache / card['name']}; measure it on identities none of "
          f"its ingredients learned: deer-reid eval {card['data']['folder']} --protocol loo --body-model {card['name']}")
    return 0


def _models_in_use(settings) -> set[str]:
    """The body models the running stack (if any) serves: never replaced under it."""
    from deer_reid.stack import pid_alive, read_state

    state = read_state(settings.home)
    if state and pid_alive(state["supervisor_pid"]):
        return {state.get("body_model"), *(state.get("body_ensemble") or [])}
    return set()


def cmd_train_viewpoint(args) -> int:
    from deer_reid.evaluation.dataset import DatasetError
    from deer_reid.training.viewpoint import ViewpointConfig, summary, train_viewpoint
    from shared.models import MissingWeights

    cfg = ViewpointConfig(name=args.name, backbone=args.backbone, seed=args.seed,
                          holdout_identities=args.holdout_identities, validation_identities=args.validation_identities,
                          target_accuracy=args.target_accuracy, overwrite=args.overwrite)
    settings = settings_for(args)
    try:
        card = train_viewpoint(Path(args.data_dir), cfg, settings, progress=not args.quiet)
    except (DatasetError, MissingWeights) as exc:
        print(f"deer-reid train viewpoint: {exc}", file=sys.stderr)
        return 2
    keep_json(card, args.json)
    print(summary(card))
    print(f"\nviewpoint classifier {card['name']} is in {settings.model_cache / card['name']}; the pose service "
          f"uses it with DEER_POSE_VIEWPOINT_MODEL={card['name']}")
    return 0
