"""One training round as Flower's SecAgg+ protocol, over the Message API.

Flower 1.41 has SecAgg+ only as a legacy workflow; this drives the same four
stages (the ones its ``secaggplus_mod`` answers at every site) with fedseg's
:class:`~server.polling_grid.PollingGrid` and strategy sampling:

1. **setup**: the protocol parameters go to the sampled sites; each answers with two public keys;
2. **share keys**: each site gets the others' public keys and returns Shamir shares of its mask
   seed and private key, encrypted for each other site;
3. **collect masked vectors**: each site gets the shares addressed to it and the global model,
   trains, and returns its weighted change to the model, quantised and masked;
4. **unmask**: the sites still present return shares that rebuild the survivors' mask seeds and
   the dropped sites' pairwise masks; the server removes the masks from the sum.

A site that drops out after sharing its keys is recovered (its masks are
removed) as long as at least ``secagg-threshold`` sites remain at every stage;
below that the round is skipped, the global model kept, and every site's row
says why. The server holds the running sum of masked vectors
(:class:`~server.secagg_sum.MaskedSum`) and the unmasked mean, never one site's update.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from server.secagg_sum import MaskedSum, SecAggSettings, SecureRoundSkipped, unmask_mean
from server.site_replies import SortedReplies, failure_reason, first_metrics, site_of
from shared.protocol import CONFIG, SERVER_ROUND, SITE, is_refusal, refusal_reason

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np
    from flwr.app import ArrayRecord

    from server.polling_grid import PollingGrid
    from server.strategies.strategy import FedSegStrategy

LOG = logging.getLogger("fedseg.server")


@dataclass
class SecureRoundResult:
    """What a secure round produced: the sites' mean change to the model (None: skipped) and every outcome."""

    mean_delta: list[np.ndarray] | None
    outcomes: SortedReplies
    skipped: str | None = None
    contributors: list[str] = field(default_factory=list)


def secure_train_round(strategy: FedSegStrategy, grid: PollingGrid, *, server_round: int, arrays: ArrayRecord,
                       timeout: float, settings: SecAggSettings) -> ArrayRecord:
    """One training phase as SecAgg+ with the nodes the strategy samples; returns the new global arrays."""
    messages = list(strategy.configure_train(server_round, arrays, strategy.message_record(), grid))
    secure = SecureRound(grid=grid, server_round=server_round, settings=settings, timeout=timeout,
                         known_sites=strategy.known_sites,
                         shapes=[tuple(a.shape) for name, a in arrays.items()
                                 if name not in strategy.staying_weights])
    new_arrays, _ = strategy.aggregate_secure(server_round, secure.run(messages))
    return arrays if new_arrays is None else new_arrays


class SecureRound:
    """The four SecAgg+ stages for one round (see the module docstring).

    Parameters
    ----------
    grid : PollingGrid
        Carries the messages.
    server_round : int
        The round (written into every message's config record).
    settings : SecAggSettings
        The run's protocol parameters.
    timeout : float
        Seconds to wait for the replies of each stage.
    known_sites : dict[int, str]
        Node id -> site id, learned from replies (shared across rounds).
    shapes : list of tuple of int
        The global model's array shapes, in order (a masked vector is the weight, then these).
    """

    def __init__(self, *, grid: PollingGrid, server_round: int, settings: SecAggSettings, timeout: float,
                 known_sites: dict[int, str], shapes: list[tuple[int, ...]]) -> None:
        self.grid = grid
        self.server_round = server_round
        self.settings = settings
        self.timeout = timeout
        self.known_sites = known_sites
        self.outcomes = SortedReplies()
        self.shapes = [(1,), *shapes]
        self.public_keys: dict[int, tuple[bytes, bytes]] = {}
        #: destination node -> (source nodes, their encrypted share packets for it)
        self.forward: dict[int, tuple[list[int], list[bytes]]] = {}
        self.sampled: list[int] = []

    def run(self, train_messages: list[Message]) -> SecureRoundResult:
        """Run the protocol with the nodes the strategy sampled (``train_messages``: what each would get)."""
        contents = {m.metadata.dst_node_id: m.content for m in train_messages}
        self.sampled = sorted(contents)
        if len(contents) == 2:
            LOG.warning("round %d: secure aggregation of two sites hides little: each site can subtract its own "
                        "update from the sum (README, Secure aggregation)", self.server_round)
        try:
            self._require(len(contents), "site(s) sampled")
            keyed = self._share_keys(self._setup(sorted(contents)))
            masked = MaskedSum(self.settings.modulus_range, shapes=self.shapes)
            survivors = self._collect(keyed, contents, masked)
            shares = self._unmask(survivors, dropped=set(keyed) - survivors)
            mean = unmask_mean(masked, shares=shares, survivors=survivors, dropped=set(keyed) - survivors,
                               public_keys=self.public_keys, settings=self.settings)
        except SecureRoundSkipped as exc:
            return self._skipped(str(exc))
        return SecureRoundResult(mean_delta=mean, outcomes=self.outcomes,
                                 contributors=sorted(self.outcomes.site_metrics))

    # --- the stages ---------------------------------------------------------------------
    def _setup(self, nodes: list[int]) -> list[int]:
        s = self.settings
        setup = {Key.SAMPLE_NUMBER: len(nodes), Key.SHARE_NUMBER: len(nodes), Key.THRESHOLD: s.threshold,
                 Key.CLIPPING_RANGE: s.clipping_range, Key.TARGET_RANGE: s.quantization_range,
                 Key.MOD_RANGE: s.modulus_range, Key.MAX_WEIGHT: s.max_weight}
        def keep_keys(node: int, record: ConfigRecord) -> None:
            self.public_keys[node] = (_bytes(record[Key.PUBLIC_KEY_1]), _bytes(record[Key.PUBLIC_KEY_2]))

        replies = self._exchange(Stage.SETUP, {node: setup for node in nodes}, on_record=keep_keys)
        self._require(len(replies), "site(s) sent public keys")
        return sorted(replies)

    def _share_keys(self, nodes: list[int]) -> list[int]:
        keys = {str(node): list(self.public_keys[node]) for node in nodes}
        packets: dict[int, list[tuple[int, bytes]]] = {}

        def keep_packets(node: int, record: ConfigRecord) -> None:
            packets[node] = [(int(dst), _bytes(ciphertext)) for dst, ciphertext in
                             zip(record[Key.DESTINATION_LIST], record[Key.CIPHERTEXT_LIST], strict=True)]

        replies = self._exchange(Stage.SHARE_KEYS, {node: keys for node in nodes}, on_record=keep_packets)
        self._require(len(replies), "site(s) shared their keys")
        self.forward = {node: ([], []) for node in replies}
        for src in sorted(replies):
            for dst, ciphertext in packets[src]:
                if dst in self.forward:
                    self.forward[dst][0].append(src)
                    self.forward[dst][1].append(ciphertext)
        return sorted(replies)

    def _collect(self, nodes: list[int], contents: dict[int, RecordDict], masked: MaskedSum) -> set[int]:
        def content(node: int) -> RecordDict:
            srcs, ciphertexts = self.forward[node]
            stage = ConfigRecord({Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.CIPHERTEXT_LIST: ciphertexts,
                                  Key.SOURCE_LIST: srcs})
            return RecordDict({**dict(contents[node].items()), RECORD_KEY_CONFIGS: stage})

        def add(node: int, record: ConfigRecord) -> None:
            masked.add(record[Key.MASKED_PARAMETERS])

        replies = self._exchange(Stage.COLLECT_MASKED_VECTORS, {}, contents={n: content(n) for n in nodes},
                                 on_record=add, keep_metrics=True)
        self._require(len(replies), "site(s) sent a masked vector")
        return set(replies)

    def _unmask(self, survivors: set[int], *, dropped: set[int]) -> dict[int, list[bytes]]:
        request = {Key.ACTIVE_NODE_ID_LIST: sorted(survivors), Key.DEAD_NODE_ID_LIST: sorted(dropped)}
        # a survivor that misses this stage still counts: its vector is in the sum, its seed rebuilt from shares
        returned: dict[int, list[tuple[int, bytes]]] = {}

        def keep_shares(node: int, record: ConfigRecord) -> None:
            returned[node] = [(int(owner), _bytes(share)) for owner, share in
                              zip(record[Key.NODE_ID_LIST], record[Key.SHARE_LIST], strict=True)]

        replies = self._exchange(Stage.UNMASK, {node: request for node in sorted(survivors)}, on_record=keep_shares,
                                 outcomes=False)
        self._require(len(replies), "site(s) returned key shares to unmask the sum")
        shares: dict[int, list[bytes]] = {}
        for node in sorted(replies):
            for owner, share in returned[node]:
                shares.setdefault(owner, []).append(share)
        return shares

    # --- plumbing ---------------------------------------------------------------------
    def _exchange(self, stage: str, configs: dict[int, dict[str, Any]], *, contents: dict[int, RecordDict] | None = None,
                  on_record: Callable[[int, ConfigRecord], None] | None = None, keep_metrics: bool = False,
                  outcomes: bool = True) -> dict[int, ConfigRecord]:
        """Send one stage's messages; return the protocol record of every node that answered it properly.

        A node that fails, refuses or does not answer is recorded as such (with
        ``outcomes``; else only logged) and is left out of the later stages.
        """
        lost: dict[str, dict[str, str]] = {"failed": {}, "refused": {}, "rejected": {}}
        if contents is None:
            contents = {node: RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: stage, **config})})
                        for node, config in configs.items()}
        messages = []
        for node, content in contents.items():
            content = RecordDict(dict(content.items()))
            content[CONFIG] = ConfigRecord({**dict(content.get(CONFIG, ConfigRecord()).items()),
                                            SERVER_ROUND: self.server_round})
            messages.append(Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN,
                                    group_id=str(self.server_round)))
        answered: dict[int, ConfigRecord] = {}

        def on_reply(msg: Message) -> None:
            node, site = msg.metadata.src_node_id, site_of(msg, self.known_sites)
            if msg.has_error():
                lost["failed"][site] = f"{stage}: {failure_reason(str(msg.error.reason))}"
                return
            metrics = first_metrics(msg)
            if is_refusal(metrics) or RECORD_KEY_CONFIGS not in msg.content.config_records:
                lost["refused"][site] = f"{stage}: {refusal_reason(msg.content.config_records.get(SITE))}"
                return
            record = msg.content.config_records[RECORD_KEY_CONFIGS]
            try:
                if on_record is not None:
                    on_record(node, record)
            except (KeyError, ValueError, TypeError) as exc:
                lost["rejected"][site] = f"{stage}: malformed protocol reply ({type(exc).__name__})"
                return
            answered[node] = record
            if keep_metrics:
                self.outcomes.site_metrics[site] = metrics

        unanswered = self.grid.exchange(messages, timeout=self.timeout, on_reply=on_reply)
        for node in unanswered:
            site = self.known_sites.get(node, f"node-{node}")
            lost["failed"][site] = f"{stage}: no reply within round-timeout ({self.timeout:g} s)"
        for outcome, reasons in lost.items():
            for site, reason in reasons.items():
                LOG.warning("round %d: site %s %s in secure aggregation: %s", self.server_round, site, outcome,
                            reason)
                if outcomes:
                    getattr(self.outcomes, outcome)[site] = reason
        LOG.info("round %d: secure aggregation %s: %d of %d site(s) answered", self.server_round, stage,
                 len(answered), len(messages))
        return answered

    def _require(self, count: int, what: str) -> None:
        if count < self.settings.threshold:
            raise SecureRoundSkipped(f"only {count} {what}, fewer than secagg-threshold = {self.settings.threshold}")

    def _skipped(self, reason: str) -> SecureRoundResult:
        text = f"secure aggregation round skipped: {reason}; the global model is kept"
        LOG.warning("round %d: %s", self.server_round, text)
        self.outcomes.site_metrics.clear()  # their updates are not in the model: their rows say why instead
        settled = {*self.outcomes.refused, *self.outcomes.failed, *self.outcomes.rejected}
        for node in self.sampled:
            site = self.known_sites.get(node, f"node-{node}")
            if site not in settled:
                self.outcomes.rejected[site] = text
        return SecureRoundResult(mean_delta=None, outcomes=self.outcomes, skipped=text)


def _bytes(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"expected bytes, got {type(value).__name__}")
    return value
