"""The part of TF Serving's API that tfmm's clients use, for tests (no model server is
installable here, DESIGN.md).

REST (``--rest_api_port``): ``POST /v1/models/NAME[/versions/N]:predict`` in
the columnar (``inputs``) and row (``instances``) formats, ``GET
.../metadata``, errors as ``{"error": ...}`` with TF Serving's status codes.
gRPC (``--port``): ``PredictionService.Predict`` and ``GetModelMetadata``.
Each model is the highest version of a base directory, loaded in-process and
called through its signatures, as TF Serving's default version policy does:
any of them by ``signature_name`` (a ranker's ``rank`` as well as
``serving_default``, the default), all of them listed by the metadata calls.

    with FakeTFServing({"ranker": "runs/small/export/ranker"}) as server:
        RestModel("127.0.0.1", server.rest_port, "ranker")
"""

import json
import os
import re
import socket
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import (get_model_metadata_pb2, predict_pb2,
                                     prediction_service_pb2_grpc)

from tfmm.export import latest_version

HTTP_STATUS = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "FAILED_PRECONDITION": 400}


class Error(Exception):
    """A TF Serving error status: ``code`` is a grpc.StatusCode name."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


class Servable:
    """One model version: its signatures and its SignatureDefMap (what metadata returns)."""

    def __init__(self, name, base_dir):
        self.name = name
        self.path = latest_version(base_dir)
        self.version = int(os.path.basename(self.path))
        self.loaded = tf.saved_model.load(self.path)
        proto = saved_model_pb2.SavedModel()
        with open(os.path.join(self.path, "saved_model.pb"), "rb") as f:
            proto.ParseFromString(f.read())
        self.signatures = get_model_metadata_pb2.SignatureDefMap()
        for key, value in proto.meta_graphs[0].signature_def.items():
            self.signatures.signature_def[key].CopyFrom(value)

    def signature(self, name):
        name = name or "serving_default"
        if name not in self.loaded.signatures:
            raise Error("INVALID_ARGUMENT",
                        f'Serving signature name: "{name}" not found in signature def')
        return self.loaded.signatures[name], self.signatures.signature_def[name]

    def predict(self, signature_name, inputs):
        """Runs a signature on numpy `inputs`, checked against it as TF Serving does."""
        fn, signature = self.signature(signature_name)
        sent, wanted = set(inputs), set(signature.inputs)
        if sent != wanted:
            raise Error("INVALID_ARGUMENT",
                        f"input size does not match signature: {len(sent)}!={len(wanted)} "
                        f"Sent extra: {sorted(sent - wanted)}. Missing but required: "
                        f"{sorted(wanted - sent)}.")
        specs = fn.structured_input_signature[1]
        for i, name in enumerate(sorted(inputs)):
            if inputs[name].dtype != specs[name].dtype.as_numpy_dtype:
                raise Error("INVALID_ARGUMENT",
                            f"Expects arg[{i}] to be {specs[name].dtype.name} but "
                            f"{tf.as_dtype(inputs[name].dtype).name} is provided")
        try:
            outputs = fn(**{k: tf.constant(v) for k, v in inputs.items()})
        except (tf.errors.InvalidArgumentError, TypeError, ValueError) as e:
            raise Error("INVALID_ARGUMENT", str(e).splitlines()[0]) from None
        return {k: v.numpy() for k, v in outputs.items()}


class FakeTFServing:
    """TF Serving's REST and gRPC APIs on free loopback ports.

    Args:
        models: {model name: base directory of ``<integer version>/`` SavedModels}.
    """

    def __init__(self, models):
        self.models = {name: Servable(name, path) for name, path in models.items()}
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._http.daemon_threads = True
        self._http.connections = set()
        self.rest_port = self._http.server_address[1]
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=[
            ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)])
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            _Servicer(self), self._grpc)
        self.grpc_port = self._grpc.add_insecure_port("127.0.0.1:0")
        self._grpc.start()

    def rest(self, name):
        return f"rest://127.0.0.1:{self.rest_port}/{name}"

    def grpc(self, name):
        return f"grpc://127.0.0.1:{self.grpc_port}/{name}"

    def servable(self, name, version=None):
        servable = self.models.get(name)
        if servable is None or version not in (None, servable.version):
            which = f"Latest({name})" if version is None else f"Specific({name}, {version})"
            raise Error("NOT_FOUND", f"Servable not found for request: {which}")
        return servable

    def drop_connections(self):
        """Closes the REST keep-alive connections, as a server does with idle ones."""
        for conn in list(self._http.connections):
            conn.shutdown(socket.SHUT_RDWR)

    def stop(self):
        self._http.shutdown()
        self._http.server_close()
        self.drop_connections()  # keep-alive connections die with the server
        self._grpc.stop(None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


# TF Serving's REST paths (http_rest_api_handler.cc).
_PATH = re.compile(r"/v1/models/([^/:]+)(?:/versions/(\d+))?(?::(predict)|/(metadata))$")


def _json_tensor(value, spec, name, key):
    """A JSON value as the input's dtype; TF Serving rejects e.g. 1.5 for an int64."""
    array = np.asarray(value)
    dtype = spec.dtype.as_numpy_dtype
    allowed = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}[np.dtype(dtype).kind]
    if array.size and array.dtype.kind not in allowed:
        raise Error("INVALID_ARGUMENT",
                    f"Failed to process element: {name} of '{key}' array. Error: JSON Value: "
                    f"{json.dumps(array.reshape(-1)[0].item())} is not of expected type: "
                    f"{spec.dtype.name}")
    return array.astype(dtype)


def _rest_predict(servable, body):
    try:
        request = json.loads(body)
    except ValueError as e:
        raise Error("INVALID_ARGUMENT", f"JSON Parse error: {e}") from None
    fn, _ = servable.signature(request.get("signature_name"))
    specs = fn.structured_input_signature[1]
    if ("inputs" in request) == ("instances" in request):
        raise Error("INVALID_ARGUMENT", "Missing 'inputs' or 'instances' key")
    if "inputs" in request:
        columns = request["inputs"]
        if not isinstance(columns, dict):  # a bare tensor for a one-input signature
            columns = {next(iter(specs)): columns}
    else:
        rows = request["instances"]
        if rows and not isinstance(rows[0], dict):
            rows = [{next(iter(specs)): row} for row in rows]
        columns = {k: [row[k] for row in rows] for k in (rows[0] if rows else {})}
    key = "inputs" if "inputs" in request else "instances"
    inputs = {k: _json_tensor(v, specs[k], k, key) if k in specs else np.asarray(v)
              for k, v in columns.items()}
    outputs = {k: v.tolist() for k, v in servable.predict(
        request.get("signature_name"), inputs).items()}
    if key == "inputs":  # one named output comes bare
        return {"outputs": next(iter(outputs.values())) if len(outputs) == 1 else outputs}
    if len(outputs) == 1:
        return {"predictions": next(iter(outputs.values()))}
    n = len(next(iter(outputs.values())))
    return {"predictions": [{k: v[i] for k, v in outputs.items()} for i in range(n)]}


def _rest_metadata(servable):
    spec = {"name": servable.name, "signature_name": "", "version": str(servable.version)}
    # As TF Serving prints it: snake_case names, defaults included, int64 sizes as strings.
    signatures = json_format.MessageToDict(servable.signatures, preserving_proto_field_name=True,
                                           always_print_fields_with_no_presence=True)
    return {"model_spec": spec, "metadata": {"signature_def": signatures}}


def _handler(server):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as TF Serving's HTTP server

        def setup(self):
            super().setup()
            server._http.connections.add(self.connection)

        def finish(self):
            server._http.connections.discard(self.connection)
            super().finish()

        def log_message(self, *args):
            pass

        def _reply(self, status, value):
            data = json.dumps(value).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _serve(self, verb):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            match = _PATH.match(self.path)
            try:
                if not match or (verb == "POST") != bool(match[3]):
                    raise Error("INVALID_ARGUMENT", f"Malformed request: {verb} {self.path}")
                version = int(match[2]) if match[2] else None
                servable = server.servable(match[1], version)
                self._reply(200, _rest_predict(servable, body) if match[3]
                            else _rest_metadata(servable))
            except Error as e:
                self._reply(HTTP_STATUS.get(e.code, 500), {"error": str(e)})

        def do_GET(self):
            self._serve("GET")

        def do_POST(self):
            self._serve("POST")

    return Handler


class _Servicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, server):
        self.server = server

    def _servable(self, spec):
        return self.server.servable(spec.name, spec.version.value if spec.HasField("version")
                                    else None)

    def Predict(self, request, context):
        try:
            servable = self._servable(request.model_spec)
            outputs = servable.predict(request.model_spec.signature_name, {
                k: tf.make_ndarray(v) for k, v in request.inputs.items()})
        except Error as e:
            context.abort(getattr(grpc.StatusCode, e.code), str(e))
        response = predict_pb2.PredictResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        response.model_spec.signature_name = request.model_spec.signature_name or "serving_default"
        for k, v in outputs.items():
            response.outputs[k].CopyFrom(tf.make_tensor_proto(v))
        return response

    def GetModelMetadata(self, request, context):
        try:
            servable = self._servable(request.model_spec)
            if list(request.metadata_field) != ["signature_def"]:
                raise Error("INVALID_ARGUMENT", "Metadata field(s) "
                            f"{list(request.metadata_field)} not supported; want signature_def")
        except Error as e:
            context.abort(getattr(grpc.StatusCode, e.code), str(e))
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        response.metadata["signature_def"].Pack(servable.signatures)
        return response
