"""The online predictor (paper §5, Figure 4): a request -> the ranker's inputs -> P(click).

A `Request` names a user, the user's recent behaviour (item ids, oldest
first) and the candidate items to rank. `Predictor` turns it into the
ranker's inputs exactly as the training reader builds them
(`tfmm.data.impressions`): the history cut to the most recent L items and
padded with 0 after them; category ids from the catalogue; multimodal
vectors from the index table, zeros where an item has none (the training
fallback, counted in ``Predictor.stats``). A candidate neither the catalogue
nor the index knows gets a defined score (``unknown_score``, default 0: after
every known one), not the ranker's guess; invalid ids are refused. A
SavedModel with the ``rank`` signature (tfmm exports rankers with it,
`tfmm.export`) gets one row for the user with all candidates and the history
once; otherwise ``serving_default`` gets one row per candidate, each
repeating the history. It then calls the
SavedModel in-process, or TF Serving over REST or gRPC:

    predictor = Predictor.from_data_dir(
        "runs/small/export/ranker",  # or rest://host:8501/ranker, grpc://host:8500/ranker
        "data/small", index=SQLiteIndex("runs/small/index/vectors.db"))
    p = predictor.predict(Request(user_id=7, history_item_ids=[12, 40, 33],
                                  candidate_item_ids=[5, 81, 102]))   # [3] float32

L, d, which inputs exist and whether ``rank`` is there are read from the
served signatures (the model metadata API for TF Serving), so an ID-only
ranker needs no index.
"""

import collections
import dataclasses
import functools
import http.client
import json
import logging
import os
import threading
import time
import urllib.parse
from typing import Mapping, Optional, Sequence

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow_serving.apis import (get_model_metadata_pb2, predict_pb2,
                                     prediction_service_pb2_grpc)

from tfmm.data import schema
from tfmm.export import SIGNATURE, latest_version
from tfmm.ranker import ID_INPUTS, RANK_SIGNATURE

VECTOR_INPUTS = ("item_vector", "history_vectors")

log = logging.getLogger("tfmm.serving.predictor")


class ServingError(RuntimeError):
    """A model server could not be reached or refused a call; the message names it."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One user's ranking request.

    Args:
        user_id: the user's id.
        history_item_ids: the user's behaviour, oldest first, any length
            (the predictor keeps the most recent L).
        candidate_item_ids: the items to score.
        history_category_ids, candidate_category_ids: optional, as long as
            their item lists; when given they replace the catalogue look-up
            (e.g. for items created after the catalogue was loaded).
    """

    user_id: int
    history_item_ids: Sequence[int]
    candidate_item_ids: Sequence[int]
    history_category_ids: Optional[Sequence[int]] = None
    candidate_category_ids: Optional[Sequence[int]] = None


def _choose_signature(available, signature, where):
    """`signature`, or ``rank`` when the model has it, else ``serving_default``."""
    if signature is None:
        signature = RANK_SIGNATURE if RANK_SIGNATURE in available else SIGNATURE
    if signature not in available:
        raise ServingError(f"{where} has no {signature!r} signature (it has "
                           f"{sorted(available)}).")
    return signature


def _output_name(outputs, output, where):
    """The signature output to return: `output`, or the only one there is."""
    outputs = sorted(outputs)
    if output is None and len(outputs) == 1:
        return outputs[0]
    if output not in outputs:
        raise ValueError(f"{where}: choose `output` among the signature's outputs {outputs}.")
    return output


class Model:
    """A served signature: ``rank`` when the model has it, else ``serving_default``.

    ``signature`` names it; ``inputs`` maps each input name to a
    `tf.TensorSpec`; calling the model with a dict of numpy arrays returns
    the chosen output as a numpy array. Implementations are safe to call
    from many threads.
    """

    signature: str
    inputs: Mapping[str, tf.TensorSpec]
    output: str

    def __call__(self, features):
        raise NotImplementedError

    def padded(self, n):
        """How many candidates to send for `n` (the predictor pads with id 0 and drops
        their scores): n, unless the model runs faster on a few distinct shapes."""
        return n


class SavedModel(Model):
    """The signature of a SavedModel loaded in this process.

    With `jit_compile` the signature runs as one XLA program: on a 2-core
    CPU a ranker's ``rank`` request (1 user x 200 candidates, history 100)
    took 4.5 instead of 6.0 ms at p50, 7.1 instead of 9.8 ms at p99
    (BENCHMARKS.md). XLA compiles once per input shape (0.3-0.7 s there),
    so `padded` rounds candidate counts up to one of eight sizes per power
    of two (at most 1/8 more rows; 200 -> 208); the first request of each
    size pays the compilation. A SavedModel XLA cannot compile (an
    unsupported op) is called as it is, with a warning. Outputs equal the
    uncompiled ones up to float rounding (~1e-7).

    Args:
        path: a SavedModel directory, or a base directory of
            ``<integer version>/`` SavedModels (the highest is loaded).
        output: the output to return (default: the only one).
        signature: the signature to call (default: ``rank`` if the
            SavedModel has it, else ``serving_default``).
        jit_compile: run the signature through XLA (default); False for a
            process that calls it once or twice (compiling costs more).
    """

    def __init__(self, path, output=None, signature=None, jit_compile=True):
        self.path = latest_version(path)
        # Held so the signature's variables live as long as this object.
        self._loaded = tf.saved_model.load(self.path)
        try:
            self.signature = _choose_signature(self._loaded.signatures, signature, self.path)
        except ServingError as e:
            raise ValueError(str(e)) from None
        self._fn = self._loaded.signatures[self.signature]
        self.inputs = dict(self._fn.structured_input_signature[1])
        self.output = _output_name(self._fn.structured_outputs, output, self.path)
        self._compiled = self._compile() if jit_compile else None

    def _compile(self):
        """The signature as an XLA function, or None (with a warning) where XLA cannot
        compile it: tried once here on zeros, so later errors are the model's own."""
        # A partial, not a lambda: tf.function counts traces by code object, and every
        # SavedModel's function traces once (a lambda's would warn of retracing).
        fn = tf.function(functools.partial(_call_signature, self._fn, self.output),
                         input_signature=[self.inputs], jit_compile=True)
        zeros = {k: tf.zeros([1 if d is None else d for d in spec.shape], spec.dtype)
                 for k, spec in self.inputs.items()}
        try:
            fn(zeros)
        except (tf.errors.OpError, ValueError, TypeError) as e:
            log.warning("%s: XLA cannot compile the %r signature, calling it uncompiled "
                        "(%s)", self.path, self.signature, str(e).splitlines()[0][:200])
            return None
        return fn

    def __repr__(self):
        return f"{self.path} (in-process, {self.signature})"

    def padded(self, n):
        if self._compiled is None:
            return n
        step = 1 << max(0, n.bit_length() - 4)  # eight sizes per power of two
        return -(-n // step) * step

    def __call__(self, features):
        features = {k: tf.constant(v) for k, v in features.items()}
        if self._compiled is not None:
            return self._compiled(features).numpy()
        return self._fn(**features)[self.output].numpy()


def _call_signature(fn, output, features):
    return fn(**features)[output]


def _signature_inputs(signatures, where, signature=None):
    """(signature name, inputs {name: TensorSpec}, output names) in a SignatureDefMap:
    `signature`, or ``rank`` when there is one, else ``serving_default``."""
    chosen = _choose_signature(signatures.signature_def, signature, where)
    signature = signatures.signature_def[chosen]
    inputs = {}
    for name, info in signature.inputs.items():
        if info.tensor_shape.unknown_rank:
            raise ServingError(f"{where}: input {name!r} has an unknown rank.")
        shape = [None if d.size < 0 else d.size for d in info.tensor_shape.dim]
        inputs[name] = tf.TensorSpec(shape, tf.as_dtype(info.dtype), name)
    return chosen, inputs, list(signature.outputs)


def _model_spec(spec, name, version):
    spec.name = name
    if version is not None:
        spec.version.value = int(version)


class RestModel(Model):
    """A model served by TF Serving's REST API.

    Learns the signatures from ``GET /v1/models/NAME[/versions/N]/metadata``
    and predicts with ``POST ...:predict`` in the columnar (``inputs``)
    format. Each thread keeps one persistent HTTP connection. Through
    ``serving_default`` the history's [L, d] vectors repeat for every
    candidate (megabytes of JSON text for 200 candidates); ``rank`` sends
    them once.

    Args:
        host, port: TF Serving's REST address (``--rest_api_port``).
        name: the model name; version: a version number (default: latest).
        timeout: seconds for connecting and for each reply.
        output: the signature output to return (default: the only one).
        signature: the signature to call (default: ``rank`` if the model
            has it, else ``serving_default``).
    """

    def __init__(self, host, port, name, version=None, timeout=10.0, output=None,
                 signature=None):
        self.host, self.port, self.timeout = host, int(port), timeout
        self.path = f"/v1/models/{name}" + ("" if version is None else f"/versions/{version}")
        self.url = f"http://{host}:{self.port}{self.path}"
        self._local = threading.local()
        meta = self._request("GET", self.path + "/metadata")
        try:
            signatures = json_format.ParseDict(meta["metadata"]["signature_def"],
                                               get_model_metadata_pb2.SignatureDefMap(),
                                               ignore_unknown_fields=True)
        except (KeyError, TypeError, json_format.ParseError) as e:
            raise ServingError(f"{self.url}/metadata: not TF Serving's model metadata "
                               f"({e!r}).") from None
        self.signature, self.inputs, outputs = _signature_inputs(signatures, self.url, signature)
        self.output = _output_name(outputs, output, self.url)

    def __repr__(self):
        return f"{self.url} ({self.signature})"

    def _connection(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection(
                self.host, self.port, timeout=self.timeout)
        return conn

    def _request(self, method, path, body=None):
        for attempt in range(2):
            conn = self._connection()
            reused = conn.sock is not None
            try:
                conn.request(method, path, body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                status, data = response.status, response.read()
                break
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                # The server may close an idle keep-alive connection: retry once on a new one.
                if reused and attempt == 0 and isinstance(e, ConnectionError):
                    continue
                raise ServingError(f"{self.url}: {method} {path} failed: {e!r}") from None
        try:
            reply = json.loads(data)
        except ValueError:
            raise ServingError(f"{self.url}: HTTP {status}, not JSON: {data[:200]!r}") from None
        if status != 200 or "error" in reply:
            raise ServingError(f"{self.url}: HTTP {status}: {reply.get('error', reply)}")
        return reply

    def __call__(self, features):
        inputs = ", ".join(f"{json.dumps(k)}: {_json(v)}" for k, v in features.items())
        body = f'{{"signature_name": {json.dumps(self.signature)}, "inputs": {{{inputs}}}}}'
        outputs = self._request("POST", self.path + ":predict", body)["outputs"]
        # One named output comes bare; several come as an object (TF Serving's REST API).
        if isinstance(outputs, dict):
            outputs = outputs[self.output]
        return np.asarray(outputs)


def _json(array):
    """JSON text of an array; a row repeated by broadcasting (the user's history, with
    its [L, d] vectors, for each candidate) is encoded once."""
    if array.ndim and len(array) > 1 and array.strides[0] == 0:
        return f"[{', '.join([_json(array[0])] * len(array))}]"
    return json.dumps(array.tolist())


class GrpcModel(Model):
    """A model served by TF Serving's gRPC ``PredictionService``.

    Learns the signatures with ``GetModelMetadata`` (field ``signature_def``)
    and predicts with ``Predict``. The channel is shared by all threads.

    Args:
        target: ``host:port`` (``--port``).
        name: the model name; version: a version number (default: latest).
        timeout: seconds per call.
        output: the signature output to return (default: the only one).
        signature: the signature to call (default: ``rank`` if the model
            has it, else ``serving_default``).
    """

    def __init__(self, target, name, version=None, timeout=10.0, output=None, signature=None):
        self.name, self.version, self.timeout = name, version, timeout
        self.url = f"grpc://{target}/{name}" + ("" if version is None else f"/versions/{version}")
        # serving_default requests of 200 candidates x L x d floats exceed gRPC's 4 MB default.
        self._channel = grpc.insecure_channel(target, options=[
            ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)])
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        _model_spec(request.model_spec, name, version)
        response = self._call(self._stub.GetModelMetadata, request)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        if not response.metadata["signature_def"].Unpack(signatures):
            raise ServingError(f"{self.url}: GetModelMetadata returned no signature_def.")
        self.signature, self.inputs, outputs = _signature_inputs(signatures, self.url, signature)
        self.output = _output_name(outputs, output, self.url)

    def __repr__(self):
        return f"{self.url} ({self.signature})"

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise ServingError(f"{self.url}: {e.code().name}: {e.details()}") from None

    def __call__(self, features):
        request = predict_pb2.PredictRequest()
        _model_spec(request.model_spec, self.name, self.version)
        request.model_spec.signature_name = self.signature
        for k, v in features.items():
            request.inputs[k].CopyFrom(tf.make_tensor_proto(v))
        response = self._call(self._stub.Predict, request)
        return tf.make_ndarray(response.outputs[self.output])

    def close(self):
        self._channel.close()


def open_model(spec, timeout=10.0, signature=None, jit_compile=True):
    """A `Model` from ``rest://host:port/NAME[/versions/N]``, ``grpc://...`` or a path.

    `signature`: the one to call; default ``rank`` when the model has it,
    else ``serving_default``. `jit_compile`: a path's `SavedModel` runs
    through XLA.
    """
    url = urllib.parse.urlsplit(spec)
    if url.scheme not in ("rest", "grpc"):
        return SavedModel(spec, signature=signature, jit_compile=jit_compile)
    parts = url.path.strip("/").split("/")
    if not url.hostname or not url.port or not parts[0] or len(parts) not in (1, 3) or (
            len(parts) == 3 and (parts[1] != "versions" or not parts[2].isdigit())):
        raise ValueError(f"{spec!r}: want {url.scheme}://host:port/MODEL_NAME[/versions/N].")
    version = int(parts[2]) if len(parts) == 3 else None
    if url.scheme == "rest":
        return RestModel(url.hostname, url.port, parts[0], version, timeout, signature=signature)
    return GrpcModel(f"{url.hostname}:{url.port}", parts[0], version, timeout,
                     signature=signature)


def item_categories(data_dir):
    """Each catalogue item's category id, as an int64 array indexed by item id (0: unknown)."""
    meta = schema.read_metadata(data_dir)
    spec = {k: tf.io.FixedLenFeature([], tf.int64) for k in ("item_id", "category_id")}
    ids, categories = [], []
    for batch in tf.data.TFRecordDataset(schema.files(data_dir, meta, "items")).batch(4096):
        parsed = tf.io.parse_example(batch, spec)
        ids.append(parsed["item_id"].numpy())
        categories.append(parsed["category_id"].numpy())
    ids, categories = np.concatenate(ids), np.concatenate(categories)
    table = np.zeros(max(meta["vocab"]["num_items"], ids.max(initial=-1) + 1), np.int64)
    table[ids] = categories
    return table


def _ids(value, field, low=None):
    """`value` as int64 ids; with `low`, ValueError names the first id below it."""
    ids = np.asarray(value)
    if ids.size == 0:
        return np.zeros(ids.shape, np.int64)
    if ids.dtype.kind not in "iu":
        raise ValueError(f"Request.{field}: want integer ids, got {ids.dtype} values.")
    ids = ids.astype(np.int64)
    if low is not None and (ids < low).any():
        raise ValueError(f"Request.{field}: {ids[ids < low].flat[0]} is not an item id (item "
                         f"ids start at {schema.FIRST_ID}; 0 is padding, 1 out-of-vocabulary).")
    return ids


class Predictor:
    """Scores a user's candidates with a ranker, fetching item vectors from the index.

    Args:
        model: a `Model`, or a spec for `open_model`: a SavedModel path
            (a base directory loads its highest version),
            ``rest://host:port/NAME`` or ``grpc://host:port/NAME``.
        index: a `tfmm.index.VectorIndex`; needed when the ranker takes vectors.
        item_categories: item id -> category id, as an array indexed by id
            or a mapping; ids it does not know get category 0 (padding).
        signature: with a spec, the signature to call (default: ``rank``
            when the model has it, else ``serving_default``); a `Model`
            brings its own (``model.signature``).
        catalogue: the fingerprint of the catalogue the requests' item ids
            come from (`tfmm.data.schema.catalogue_fingerprint`); an index
            that `claim`-ed another catalogue is refused: its ids name other
            items.
        missing_warning: a request whose share of items without a vector
            reaches this logs a warning (at most one a minute): an emptied
            index (a Redis restarted without persistence) scores everything
            with zeros and fails no request.
        unknown_score: the P(click) of a candidate the ranker knows nothing
            of: an id that `item_categories` does not list and the index
            has no vector for. The ranker would score it with its padding
            embedding, a value training never shaped (such ids came out 1st
            and 2nd of 200 in one run); 0 ranks them after every known
            candidate, a base click rate gives them the neutral prior.

    Candidate ids below 2 (0 is padding, 1 out-of-vocabulary) and negative
    history ids are refused (ValueError naming the field). An item that is
    not in the catalogue but has a vector (a new item the encoder service
    indexed) is known by its vector and scored by the ranker. Without
    `item_categories` every candidate counts as known.

    ``stats`` counts ``requests``, ``candidates``, ``vectors_looked_up``
    (distinct items of a request, history and candidates),
    ``missing_vectors`` (those with no vector in the index, scored with
    zeros) and ``unknown_candidates`` (scored `unknown_score`). Safe to call
    from many threads.

    Example:

    >>> predictor = Predictor("runs/small/export/ranker", index,  # doctest: +SKIP
    ...                       item_categories=item_categories("data/small"))
    >>> predictor.predict(Request(7, [12, 40, 33], [5, 81, 102]))  # doctest: +SKIP
    array([0.031, 0.12 , 0.008], dtype=float32)
    """

    WARN_EVERY = 60.0  # seconds between missing-vector warnings

    def __init__(self, model, index=None, item_categories=None, signature=None, catalogue=None,
                 missing_warning=0.5, unknown_score=0.0):
        self.model = (open_model(os.fspath(model), signature=signature)
                      if isinstance(model, (str, os.PathLike)) else model)
        # One row per user with C candidates (rank), or one row per candidate.
        self.per_user = getattr(self.model, "signature", SIGNATURE) == RANK_SIGNATURE
        inputs = self.model.inputs
        unknown = sorted(set(inputs) - set(ID_INPUTS) - set(VECTOR_INPUTS))
        if unknown:
            raise ValueError(f"{self.model}: the predictor cannot build inputs {unknown}; "
                             f"it knows {list(ID_INPUTS + VECTOR_INPUTS)}.")
        history = [inputs[k].shape[1] for k in inputs if k.startswith("history_")]
        if len(set(history)) > 1 or None in history:
            raise ValueError(f"{self.model}: history inputs need one fixed length L, got "
                             f"{ {k: v.shape for k, v in inputs.items()} }.")
        self.max_history = history[0] if history else 0
        dims = {inputs[k].shape[-1] for k in VECTOR_INPUTS if k in inputs}
        self.vector_dim = dims.pop() if len(dims) == 1 else None
        if dims or (self.vector_dim is None and any(k in inputs for k in VECTOR_INPUTS)):
            raise ValueError(f"{self.model}: vector inputs need one fixed width d.")
        if self.vector_dim:
            if index is None:
                raise ValueError(f"{self.model} takes {self.vector_dim}-d item vectors: "
                                 "pass the index table (`index=`).")
            if index.dim != self.vector_dim:
                raise ValueError(f"{index} holds {index.dim}-d vectors but {self.model} "
                                 f"takes {self.vector_dim}-d ones.")
            held = None if catalogue is None else index.catalogue()
            if held not in (None, catalogue):
                raise ValueError(f"{index} holds vectors of another catalogue ({held}, not "
                                 f"{catalogue}): its item ids name other items.")
        self.index = index
        self.missing_warning = missing_warning
        self.unknown_score = np.float32(unknown_score)
        self._categories = item_categories
        self._lock = threading.Lock()
        self._stats = collections.Counter(requests=0, candidates=0, vectors_looked_up=0,
                                          missing_vectors=0, unknown_candidates=0)
        self._next_warning = 0.0

    @classmethod
    def from_data_dir(cls, model, data_dir, index=None, **kwargs):
        """A predictor with the category ids of `data_dir`'s catalogue, refusing an index
        of another catalogue."""
        return cls(model, index, item_categories=item_categories(data_dir),
                   catalogue=schema.catalogue_fingerprint(data_dir), **kwargs)

    @property
    def stats(self):
        with self._lock:
            return dict(self._stats)

    def _category_ids(self, items, given, field):
        if given is not None:
            given = _ids(given, field)
            if given.shape != items.shape:
                raise ValueError(f"Request.{field}: {given.size} category ids for "
                                 f"{items.size} items.")
            return given
        table = self._categories
        if table is None:
            return np.zeros_like(items)
        if isinstance(table, Mapping):
            return np.array([table.get(int(i), 0) for i in items], np.int64).reshape(items.shape)
        table = np.asarray(table)
        known = (items >= 0) & (items < len(table))
        return np.where(known, table[np.where(known, items, 0)], 0).astype(np.int64)

    def _in_catalogue(self, items):
        """Whether `item_categories` lists each of `items` (all True without it)."""
        table = self._categories
        if table is None:
            return np.ones(items.shape, bool)
        if isinstance(table, Mapping):
            return np.array([int(i) in table for i in items], bool).reshape(items.shape)
        return items < len(table)

    def assemble(self, request):
        """The signature's inputs for `request` and the item ids that had no vector.

        For ``rank``, one row: ``item_id`` [1, C], ``history_*`` [1, L],
        vectors [1, C, d] and [1, L, d]; for ``serving_default``, C rows
        that repeat the history (views of one row, without copies). C is the
        number of candidates rounded up by the model (`Model.padded`), the
        extra ones id 0 with zero vectors.
        """
        features, missing, _, _ = self._assemble(request)
        return features, missing

    def _assemble(self, request):
        """`assemble`'s, how many distinct items' vectors were looked up, and which
        candidates are unknown (no catalogue entry, no vector)."""
        user = _ids(request.user_id, "user_id")
        if user.ndim != 0:
            raise ValueError(f"Request.user_id: want one id, got shape {user.shape}.")
        candidates = _ids(request.candidate_item_ids, "candidate_item_ids", schema.FIRST_ID)
        # 0 pads a history, 1 is the out-of-vocabulary item training histories may hold.
        history = _ids(request.history_item_ids, "history_item_ids", schema.PAD_ID)
        if candidates.ndim != 1 or history.ndim != 1:
            raise ValueError("Request: candidate_item_ids and history_item_ids must be lists.")
        history_categories = self._category_ids(history, request.history_category_ids,
                                                "history_category_ids")
        n, length = self.model.padded(len(candidates)), self.max_history
        # The most recent L items, oldest first, then padding: as the training reader.
        recent = slice(max(len(history) - length, 0), None)
        history, history_categories = history[recent], history_categories[recent]
        pad = length - len(history)
        history = np.pad(history, (0, pad))
        history_categories = np.pad(history_categories, (0, pad))
        mask = history != schema.PAD_ID

        def rows(x):
            """The user's `x` as the batch: one row, or one row per candidate."""
            return x[None] if self.per_user else np.broadcast_to(x, (n,) + x.shape)

        def candidate_rows(x):
            """Per-candidate `x` [C, ...] as the batch: [1, C, ...], or C rows."""
            return x[None] if self.per_user else x

        def padded(x):  # the model's extra candidates: id 0, category 0
            return np.pad(x, (0, n - len(x)))

        sent = padded(candidates)
        features = {
            "user_id": rows(user),
            "item_id": candidate_rows(sent),
            "category_id": candidate_rows(padded(self._category_ids(
                candidates, request.candidate_category_ids, "candidate_category_ids"))),
            "history_item_ids": rows(history),
            "history_category_ids": rows(history_categories),
            "history_mask": rows(mask),
        }
        missing, keys = np.zeros(0, np.int64), ()
        unknown = ~self._in_catalogue(candidates)
        if self.vector_dim:
            # One index round trip for the history and the candidates together.
            keys = np.unique(np.concatenate([history[mask], candidates]))
            keys = keys[keys != schema.PAD_ID]
            vectors, found = self.index.get(keys)
            missing = keys[~found]
            # Row 0 of the table is the zero vector of padding.
            table = np.concatenate([np.zeros((1, self.vector_dim), np.float32), vectors])

            def positions(ids):
                return np.where(ids == schema.PAD_ID, 0, np.searchsorted(keys, ids) + 1)

            features["item_vector"] = candidate_rows(table[positions(sent)])
            features["history_vectors"] = rows(table[positions(history)])
            unknown &= np.isin(candidates, missing)
        # History rows stay views of one row: tf.constant copies them once, faster than numpy.
        inputs = self.model.inputs
        features = {k: v.astype(inputs[k].dtype.as_numpy_dtype, copy=False)
                    for k, v in features.items() if k in inputs}
        return features, missing, len(keys), unknown

    def predict(self, request):
        """P(click) of each candidate of `request`: float32 [len(candidate_item_ids)]."""
        features, missing, looked_up, unknown = self._assemble(request)
        n = len(request.candidate_item_ids)
        sent = self.model.padded(n)
        p = np.asarray(self.model(features) if n else [], np.float32).reshape(-1)
        if len(p) != sent:
            raise ServingError(f"{self.model}: {len(p)} outputs for {sent} candidates.")
        p = p[:n]
        p = np.where(unknown, self.unknown_score, p)
        now = time.monotonic()
        with self._lock:
            self._stats.update(requests=1, candidates=n, vectors_looked_up=looked_up,
                               missing_vectors=len(missing), unknown_candidates=int(unknown.sum()))
            warn = (looked_up and len(missing) >= self.missing_warning * looked_up
                    and now >= self._next_warning)
            if warn:
                self._next_warning = now + self.WARN_EVERY
                totals = dict(self._stats)
        if warn:
            log.warning("%d of the %d items of a request have no vector in %s and were scored "
                        "with zeros (an emptied index?); totals %s", len(missing), looked_up,
                        self.index, totals)
        return p
