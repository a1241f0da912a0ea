"""High-level Python client of the Amalgam service (``amalgam.v1`` over gRPC)."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import sys
import time
from typing import (Dict, Iterable, Iterator, List, Mapping, Optional,
                    Sequence, Tuple, Union)

import grpc
import torch

from amalgam import safetensors
from amalgam.v1 import amalgam_pb2 as pb
from amalgam.v1 import amalgam_pb2_grpc as pb_grpc

_CHUNK = 1 << 20
_MAX_MESSAGE = 16 << 20

Source = Union[str, "os.PathLike[str]", Mapping[str, torch.Tensor], object]
ArtifactRef = Union[str, pb.Artifact]

_METHODS = {
    "average": pb.MERGE_METHOD_AVERAGE,
    "weighted": pb.MERGE_METHOD_WEIGHTED,
    "fisher": pb.MERGE_METHOD_FISHER,
    "regmean": pb.MERGE_METHOD_REGMEAN,
    "task_arithmetic": pb.MERGE_METHOD_TASK_ARITHMETIC,
    "ties": pb.MERGE_METHOD_TIES,
    "dare_linear": pb.MERGE_METHOD_DARE_LINEAR,
    "dare_ties": pb.MERGE_METHOD_DARE_TIES,
    "slerp": pb.MERGE_METHOD_SLERP,
    "model_stock": pb.MERGE_METHOD_MODEL_STOCK,
}
_RESCALE = {
    "inverse-density": pb.DARE_RESCALE_INVERSE_DENSITY,
    "l1": pb.DARE_RESCALE_L1,
}
_PRECISION = {
    "float64": pb.PRECISION_FLOAT64,
    "float32": pb.PRECISION_FLOAT32,
}
_DTYPES = {
    "float16": pb.DTYPE_F16,
    "bfloat16": pb.DTYPE_BF16,
    "float32": pb.DTYPE_F32,
    "float64": pb.DTYPE_F64,
}
_GRAM_NORMALIZATION = {
    "as_uploaded": pb.GRAM_NORMALIZATION_AS_UPLOADED,
    "mean": pb.GRAM_NORMALIZATION_MEAN,
}
# Errors after which an upload is resumed: the connection or server went
# away, or the previous stream of the same upload was still open.
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED)
_FINAL = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)


def _output(shard_size: Optional[int], config_from: Optional[int],
            out_dtype: Optional[str]) -> pb.OutputOptions:
    """How a job writes its results: Hugging Face model directories in
    shards of at most ``shard_size`` bytes of tensors (default 5 GB), with
    the side files of input ``config_from`` and tensors of ``out_dtype``."""
    output = pb.OutputOptions(shard_size_bytes=int(shard_size or 0))
    if config_from is not None:
        output.config_from = int(config_from)
    if out_dtype is not None:
        if out_dtype not in _DTYPES:
            raise ValueError(f"out_dtype must be one of {sorted(_DTYPES)}")
        output.out_dtype = _DTYPES[out_dtype]
    return output


def _derived_upload_id(header: pb.UploadHeader, identity: Sequence[os.stat_result] = ()) -> str:
    """The default upload id, as the C++ client derives it: a digest of the
    header and, where the header has no sha256 (the files are hashed while
    they are sent), of which files these are: device, inode and mtime."""
    text = (f"{header.kind}\n{header.name}\n{header.describes}\n"
            f"{header.size_bytes}\n{header.sha256}")
    # A model directory: how its bytes divide into files, too.
    text += "".join(f"\n{f.name}\n{f.size_bytes}" for f in header.files)
    if not header.sha256:
        text += "".join(f"\n{st.st_dev}:{st.st_ino}:{st.st_mtime_ns}" for st in identity)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class _ConcatenatedFiles:
    """The files of a model directory read as one stream (seek and read)."""

    def __init__(self, parts: List[Tuple[str, int]]):
        self._parts = parts
        self._index = 0
        self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()

    def _open(self, index: int, within: int) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._index = index
        if index < len(self._parts):
            self._file = open(self._parts[index][0], "rb")
            self._file.seek(within)

    def seek(self, offset: int) -> None:
        index = 0
        while index < len(self._parts) and offset >= self._parts[index][1]:
            offset -= self._parts[index][1]
            index += 1
        self._open(index, offset)

    def read(self, n: int) -> bytes:
        while self._file is not None:
            data = self._file.read(n)
            if data:
                return data
            self._open(self._index + 1, 0)
        return b""


def _model_files(directory: str) -> List[str]:
    """The files of a model directory, sorted by name."""
    paths = [os.path.join(directory, entry) for entry in sorted(os.listdir(directory))]
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"{path} is not a regular file; a model directory "
                             "holds files only")
    return paths


class AmalgamError(Exception):
    """An error from the service: ``code`` is a ``grpc.StatusCode`` and
    ``message`` the server's message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> "AmalgamError":
        return cls(error.code(), error.details() or "")

    @classmethod
    def from_number(cls, number: int, message: str) -> "AmalgamError":
        for code in grpc.StatusCode:
            if code.value[0] == number:
                return cls(code, message)
        return cls(grpc.StatusCode.UNKNOWN, message)


def _ref(artifact: Optional[ArtifactRef]) -> str:
    if artifact is None:
        return ""
    return artifact.id if isinstance(artifact, pb.Artifact) else str(artifact)


def _progress_bar(total: int, description: str):
    """A tqdm bar on stderr when it is a terminal, else None."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is optional
        return None
    return tqdm(total=total, unit="B", unit_scale=True, desc=description,
                file=sys.stderr, leave=False)


class Job:
    """A job on the server. ``state`` and ``job`` reflect the last refresh."""

    def __init__(self, client: "Client", job: pb.Job):
        self._client = client
        self.job = job

    @property
    def id(self) -> str:
        return self.job.id

    @property
    def state(self) -> str:
        """``queued``, ``running``, ``succeeded``, ``failed`` or ``cancelled``."""
        return pb.JobState.Name(self.job.state)[len("JOB_STATE_"):].lower()

    @property
    def result_ids(self) -> List[str]:
        return list(self.job.result_ids)

    def refresh(self) -> "Job":
        self.job = self._client._call(self._client._jobs.GetJob,
                                      pb.GetJobRequest(id=self.id))
        return self

    def events(self) -> Iterator[pb.Job]:
        """Yields the job at every state change and progress update until it
        ends (the last one is final)."""
        stream = self._client._jobs.WatchJob(
            pb.WatchJobRequest(id=self.id), metadata=self._client._metadata)
        try:
            for event in stream:
                self.job = event.job
                yield event.job
        except grpc.RpcError as error:
            raise AmalgamError.from_rpc(error) from None

    def wait(self, timeout: Optional[float] = None) -> "Job":
        """Blocks until the job ends. Raises AmalgamError carrying the job's
        error if it failed, CANCELLED if it was cancelled, DEADLINE_EXCEEDED
        after ``timeout`` seconds."""
        if self.job.state not in _FINAL:
            stream = self._client._jobs.WatchJob(
                pb.WatchJobRequest(id=self.id), metadata=self._client._metadata,
                timeout=timeout)
            try:
                for event in stream:
                    self.job = event.job
            except grpc.RpcError as error:
                raise AmalgamError.from_rpc(error) from None
            if self.job.state not in _FINAL:
                self.refresh()
        if self.job.state == pb.JOB_STATE_FAILED:
            raise AmalgamError.from_number(self.job.error_code,
                                           self.job.error_message)
        if self.job.state == pb.JOB_STATE_CANCELLED:
            raise AmalgamError(grpc.StatusCode.CANCELLED,
                               f"job {self.id} was cancelled")
        return self

    def cancel(self) -> "Job":
        self.job = self._client._call(self._client._jobs.CancelJob,
                                      pb.CancelJobRequest(id=self.id))
        return self

    def _result(self) -> str:
        self.wait()
        if not self.job.result_ids:
            raise AmalgamError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"job {self.id} has no result")
        return self.job.result_ids[0]

    def download(self, path) -> str:
        """Waits for the job and writes its result to ``path`` (a directory,
        or a ``.safetensors`` file for a one-shard model)."""
        return self._client.download(self._result(), path)

    def save_pretrained(self, directory) -> str:
        """Waits for the job and writes its result as a Hugging Face model
        directory, which ``from_pretrained(directory)`` loads."""
        return self._client.download(self._result(), directory)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Waits for the job and returns its result as tensors."""
        return self._client.state_dict(self._result())

    @property
    def report(self) -> Optional[dict]:
        """A grow job's report (the new config, the properties that hold
        exactly, caveats) as a dict; None for other jobs."""
        return json.loads(self.job.report_json) if self.job.report_json else None

    def models(self) -> Iterator[Tuple[float, Dict[str, torch.Tensor]]]:
        """Waits for a sweep and yields ``(t, state_dict)`` for each of its
        models in order of t, downloading one at a time."""
        self.wait()
        steps = len(self.job.result_ids)
        for k, artifact_id in enumerate(self.job.result_ids):
            yield (k / (steps - 1) if steps > 1 else 0.0), self._client.state_dict(artifact_id)

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, state={self.state!r})"


class Client:
    """A connection to amalgamd.

    ``address`` is ``host:port``; ``token`` (or ``$AMALGAM_TOKEN``) is sent as
    ``authorization: Bearer TOKEN``. ``tls_ca`` (a PEM path) switches to TLS;
    ``tls_cert``/``tls_key`` add a client certificate (mutual TLS). Errors
    raise :class:`AmalgamError`. An upload whose stream breaks (UNAVAILABLE,
    ABORTED) resumes from the offset the server holds, up to
    ``upload_retries`` times, waiting ``retry_backoff`` seconds, then twice
    that, ... (at most 10 s) in between.
    """

    def __init__(self, address: Optional[str] = None, token: Optional[str] = None,
                 *, timeout: float = 30.0, chunk_size: int = _CHUNK,
                 tls_ca: Optional[str] = None, tls_cert: Optional[str] = None,
                 tls_key: Optional[str] = None, upload_retries: int = 5,
                 retry_backoff: float = 0.2, dedup_below: int = 64 << 20):
        address = address or os.environ.get("AMALGAM_SERVER", "127.0.0.1:50051")
        token = token if token is not None else os.environ.get("AMALGAM_TOKEN")
        options = [("grpc.max_send_message_length", _MAX_MESSAGE),
                   ("grpc.max_receive_message_length", _MAX_MESSAGE)]
        if tls_ca is None and (tls_cert or tls_key):
            raise ValueError("tls_cert/tls_key need tls_ca (the server's CA)")
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("a client certificate needs both tls_cert and tls_key")
        if tls_ca is not None:
            def read(path):
                with open(path, "rb") as f:
                    return f.read()
            credentials = grpc.ssl_channel_credentials(
                root_certificates=read(tls_ca),
                private_key=read(tls_key) if tls_key else None,
                certificate_chain=read(tls_cert) if tls_cert else None)
            self._channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._artifacts = pb_grpc.ArtifactServiceStub(self._channel)
        self._jobs = pb_grpc.JobServiceStub(self._channel)
        self._metadata = [("authorization", f"Bearer {token}")] if token else []
        self._timeout = timeout
        self._chunk = chunk_size
        self._upload_retries = upload_retries
        self._retry_backoff = retry_backoff
        self._dedup_below = dedup_below

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method, request):
        try:
            return method(request, metadata=self._metadata, timeout=self._timeout)
        except grpc.RpcError as error:
            raise AmalgamError.from_rpc(error) from None

    # --- artifacts -------------------------------------------------------

    def upload_weights(self, source: Source, *, name: Optional[str] = None,
                       upload_id: Optional[str] = None, dedup: bool = False) -> pb.Artifact:
        """Uploads weights from a safetensors file, a model directory (its
        shards and index, config and tokenizer files) or a
        ``dict[str, Tensor]``.

        Files are read once: hashed while they are sent, the digest in the
        stream's trailer. Every upload is resumable. ``upload_id`` names it;
        by default it is derived from the kind, name, size and the files'
        device, inode and mtime, so uploading the same files again after an
        interruption (from any process) resumes it. With ``dedup`` (always
        under ``dedup_below`` bytes, 64 MiB) they are hashed first and the
        id comes from the sha256: the same content under the same name
        reuses one upload from any path. Resuming checks that the files
        still begin with the bytes the server holds (FAILED_PRECONDITION
        naming them otherwise)."""
        return self._upload(pb.ARTIFACT_KIND_WEIGHTS, source, name, None, {}, upload_id,
                            dedup)

    def get_upload(self, upload_id: str) -> pb.UploadStatus:
        """How many bytes of upload ``upload_id`` the server holds."""
        return self._call(self._artifacts.GetUpload,
                          pb.GetUploadRequest(upload_id=upload_id))

    def upload_gram(self, source: Source, *, for_weights: Optional[ArtifactRef] = None,
                    name: Optional[str] = None, num_examples: Optional[int] = None,
                    reduction: Optional[str] = None,
                    upload_id: Optional[str] = None) -> pb.Artifact:
        """Uploads Gram matrices: a path, a ``dict[str, Tensor]`` or an
        :class:`amalgam.stats.Statistics` (whose metadata travels along).
        ``for_weights`` names the weights artifact they describe."""
        metadata = {}
        if num_examples is not None:
            metadata["num_examples"] = str(num_examples)
        if reduction is not None:
            metadata["reduction"] = reduction
        return self._upload(pb.ARTIFACT_KIND_GRAM, source, name, for_weights, metadata,
                            upload_id)

    def upload_fisher(self, source: Source, *, for_weights: Optional[ArtifactRef] = None,
                      name: Optional[str] = None,
                      num_examples: Optional[int] = None,
                      upload_id: Optional[str] = None) -> pb.Artifact:
        """Uploads diagonal Fisher information (path, dict or Statistics)."""
        metadata = {}
        if num_examples is not None:
            metadata["num_examples"] = str(num_examples)
        return self._upload(pb.ARTIFACT_KIND_FISHER, source, name, for_weights, metadata,
                            upload_id)

    def _upload(self, kind, source, name, describes, metadata,
                upload_id=None, dedup=False) -> pb.Artifact:
        files = []
        identity = []
        what = "the upload"
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            if metadata:
                raise ValueError("metadata options apply to in-memory uploads only; "
                                 "a file carries its own __metadata__")
            paths = _model_files(path) if os.path.isdir(path) else [path]
            # One stat per file: its size and its identity, as of now.
            identity = [os.stat(p) for p in paths]
            parts = [(p, st.st_size) for p, st in zip(paths, identity)]
            if os.path.isdir(path):
                files = [pb.ModelFile(name=os.path.basename(p), size_bytes=n)
                         for p, n in parts]
            size = sum(n for _, n in parts)
            sha256 = ""
            if dedup or size < self._dedup_below:
                # Hashed first: the id comes from the content.
                digest = hashlib.sha256()
                with _ConcatenatedFiles(parts) as f:
                    f.seek(0)
                    for block in iter(lambda: f.read(self._chunk), b""):
                        digest.update(block)
                sha256 = digest.hexdigest()
            opener = lambda: _ConcatenatedFiles(parts)  # noqa: E731
            name = name or os.path.basename(os.path.normpath(path))
            what = path
        else:
            tensors = (source.stored_tensors() if hasattr(source, "stored_tensors")
                       else getattr(source, "tensors", source))
            if hasattr(source, "metadata") and callable(source.metadata):
                metadata = {**source.metadata(), **metadata}
            data = safetensors.dumps(
                {k: v for k, v in tensors.items()}, metadata or None)
            size = len(data)
            sha256 = hashlib.sha256(data).hexdigest()
            opener = lambda: io.BytesIO(data)  # noqa: E731
            name = name or "state_dict"
        header = pb.UploadHeader(kind=kind, name=name, size_bytes=size,
                                 sha256=sha256, describes=_ref(describes),
                                 upload_id=upload_id, files=files)
        if not upload_id:
            header.upload_id = _derived_upload_id(header, identity)
        bar = _progress_bar(size, f"upload {name}")
        backoff = self._retry_backoff
        try:
            for attempt in itertools.count():
                try:
                    held = self._held(header.upload_id)
                    if held.artifact_id:
                        # Finished already (that stream's response was lost).
                        return self.get_artifact(held.artifact_id)
                    offset = held.committed_bytes
                    digest = self._check_held(header, opener, held, what)
                    if bar is not None:
                        bar.n = offset
                        bar.refresh()
                    return self._artifacts.Upload(
                        self._upload_requests(header, opener, offset, bar, digest),
                        metadata=self._metadata).artifact
                except grpc.RpcError as rpc_error:
                    error = AmalgamError.from_rpc(rpc_error)
                except AmalgamError as amalgam_error:
                    error = amalgam_error
                if error.code not in _RETRYABLE or attempt >= self._upload_retries:
                    raise error from None
                time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
        finally:
            if bar is not None:
                bar.close()

    def _held(self, upload_id: str) -> pb.UploadStatus:
        """What the server holds of the upload; nothing for one it does not
        know."""
        try:
            return self.get_upload(upload_id)
        except AmalgamError as error:
            if error.code == grpc.StatusCode.NOT_FOUND:
                return pb.UploadStatus(upload_id=upload_id)
            raise

    def _check_held(self, header, opener, held, what):
        """Reads the bytes the server holds of the upload from the source
        and checks they are the ones it holds (FAILED_PRECONDITION naming
        the source otherwise). Returns the sha256 of them, to go on with."""
        digest = hashlib.sha256()
        with opener() as f:
            f.seek(0)
            left = held.committed_bytes
            while left > 0:
                block = f.read(min(self._chunk, left))
                if not block:
                    break
                digest.update(block)
                left -= len(block)
        if held.committed_bytes and digest.hexdigest() != held.held_sha256:
            raise AmalgamError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{what} changed since upload {header.upload_id} began: its first "
                f"{held.committed_bytes} bytes are not the ones the server holds; "
                "upload it under a new upload id")
        return digest

    def _upload_requests(self, header, opener, offset, bar, digest):
        """The stream: the header, the bytes from `offset` (hashed on into
        `digest`), and, where the header has no sha256, the trailer."""
        yield pb.UploadRequest(header=header)
        with opener() as f:
            f.seek(offset)
            for block in iter(lambda: f.read(self._chunk), b""):
                if not header.sha256:
                    digest.update(block)
                yield pb.UploadRequest(chunk=pb.UploadChunk(offset=offset, data=block))
                offset += len(block)
                if bar is not None:
                    bar.update(len(block))
        if not header.sha256:
            yield pb.UploadRequest(trailer=pb.UploadTrailer(sha256=digest.hexdigest()))

    def list_artifacts(self, kind: Optional[str] = None) -> List[pb.Artifact]:
        request = pb.ListArtifactsRequest()
        if kind is not None:
            request.kind = pb.ArtifactKind.Value(f"ARTIFACT_KIND_{kind.upper()}")
        return list(self._call(self._artifacts.ListArtifacts, request).artifacts)

    def get_artifact(self, artifact: ArtifactRef) -> pb.Artifact:
        return self._call(self._artifacts.GetArtifact,
                          pb.GetArtifactRequest(id=_ref(artifact)))

    def delete(self, artifact: ArtifactRef) -> None:
        """Deletes an artifact you own (FAILED_PRECONDITION while a job uses it)."""
        self._call(self._artifacts.DeleteArtifact,
                   pb.DeleteArtifactRequest(id=_ref(artifact)))

    def share(self, artifact: ArtifactRef, organization: str, *,
              revoke: bool = False) -> None:
        """Grants (or revokes) read access to an artifact you own."""
        self._call(self._artifacts.ShareArtifact,
                   pb.ShareArtifactRequest(id=_ref(artifact), organization=organization,
                                           revoke=revoke))

    def _download_chunks(self, artifact_id: str, file: str = "") -> Iterator[bytes]:
        """Yields the bytes of one file of the artifact (by default its one
        .safetensors file), then checks size and sha256."""
        stream = self._artifacts.Download(
            pb.DownloadRequest(artifact_id=artifact_id, file=file),
            metadata=self._metadata)
        digest = hashlib.sha256()
        size = expected_sha = None
        received = 0
        bar = None
        try:
            for chunk in stream:
                if size is None:
                    size, expected_sha = chunk.size_bytes, chunk.sha256
                    bar = _progress_bar(size, f"download {artifact_id}")
                if chunk.offset != received:
                    raise AmalgamError(grpc.StatusCode.DATA_LOSS,
                                       f"chunk at offset {chunk.offset}, expected {received}")
                digest.update(chunk.data)
                received += len(chunk.data)
                if bar is not None:
                    bar.update(len(chunk.data))
                yield chunk.data
        except grpc.RpcError as error:
            raise AmalgamError.from_rpc(error) from None
        finally:
            if bar is not None:
                bar.close()
        if received != size or digest.hexdigest() != expected_sha:
            raise AmalgamError(grpc.StatusCode.DATA_LOSS,
                               f"download of {artifact_id} does not match its size/sha256")

    def download_bytes(self, artifact: ArtifactRef, file: str = "") -> bytes:
        """Returns the bytes of one file of the artifact, by default its one
        .safetensors file (verified against its sha256)."""
        return b"".join(self._download_chunks(_ref(artifact), file))

    def state_dict(self, artifact: ArtifactRef) -> Dict[str, torch.Tensor]:
        """The artifact's tensors, from all its shards."""
        found = self.get_artifact(artifact)
        tensors: Dict[str, torch.Tensor] = {}
        for f in found.files:
            if f.name.endswith(".safetensors"):
                shard, _ = safetensors.loads(self.download_bytes(found.id, f.name))
                tensors.update(shard)
        return tensors

    def download(self, artifact: ArtifactRef, path) -> str:
        """Writes the artifact's model directory into ``path`` (created if
        missing), or, where ``path`` ends in ``.safetensors``, its one
        .safetensors file. Each file goes via a temporary file, verified,
        then renamed. Returns the path."""
        path = os.fspath(path)
        artifact_id = _ref(artifact)
        if path.endswith(".safetensors"):
            self._download_file(artifact_id, "", path)
            return path
        os.makedirs(path, exist_ok=True)
        for f in self.get_artifact(artifact_id).files:
            self._download_file(artifact_id, f.name, os.path.join(path, f.name))
        return path

    def _download_file(self, artifact_id: str, file: str, path: str) -> None:
        temp = path + ".tmp"
        try:
            with open(temp, "wb") as f:
                for data in self._download_chunks(artifact_id, file):
                    f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, path)
        finally:
            if os.path.exists(temp):
                os.remove(temp)

    # --- jobs -------------------------------------------------------------

    def merge(self, models: Sequence[ArtifactRef], method: str = "average", *,
              grams: Optional[Sequence[ArtifactRef]] = None,
              fishers: Optional[Sequence[ArtifactRef]] = None,
              coefficients: Optional[Sequence[float]] = None,
              alpha: Optional[float] = None, exclude: Iterable[str] = (),
              take_excluded_from: Optional[int] = None,
              gram_normalization: str = "as_uploaded",
              name: Optional[str] = None,
              base: Optional[ArtifactRef] = None,
              weights: Optional[Sequence[float]] = None,
              lambda_: Optional[float] = None,
              density: Optional[float] = None,
              densities: Optional[Sequence[float]] = None,
              seed: Optional[int] = None, t: Optional[float] = None,
              normalize: bool = True, rescale: Optional[str] = None,
              shard_size: Optional[int] = None, config_from: Optional[int] = None,
              out_dtype: Optional[str] = None,
              precision: str = "float64") -> Job:
        """Submits a merge of the weights ``models`` (ids or artifacts).

        ``grams`` / ``fishers`` give each model's statistics (same order) for
        ``regmean`` / ``fisher``; ``coefficients`` weight the models;
        ``exclude`` lists regexes of tensors left out, copied from model
        ``take_excluded_from`` (1-based) when given. RegMean's ``precision``
        is ``float64`` (the default) or ``float32``: about twice as fast, each
        weight's output error on the pooled inputs at most 1e-5 (a weight
        that would exceed it is redone in float64).

        The task-vector methods (``task_arithmetic``, ``ties``,
        ``dare_linear``, ``dare_ties``, ``slerp``, ``model_stock``) merge the
        models' differences to ``base``: ``weights`` (or ``coefficients``)
        weight them as given, ``lambda_`` scales the result, ``density`` (or
        per model ``densities``) is the share TIES and DARE keep, ``seed``
        DARE's mask, ``t`` slerp's position, ``normalize=False`` TIES's sum
        instead of its mean, ``rescale`` DARE's ``inverse-density`` or
        ``l1``. The server refuses parameters a method does not use.

        The result is a Hugging Face model directory: shards of at most
        ``shard_size`` bytes of tensors (default 5 GB), the side files
        (config.json, tokenizer) of model ``config_from`` (default the base,
        else the first), tensors in ``out_dtype`` (``float16``,
        ``bfloat16``, ``float32``, ``float64``; default the inputs').

        The job is validated in full before it is queued: a bad job raises
        here.
        """
        if method not in _METHODS:
            raise ValueError(f"method must be one of {sorted(_METHODS)}")
        if gram_normalization not in _GRAM_NORMALIZATION:
            raise ValueError(f"gram_normalization must be one of {sorted(_GRAM_NORMALIZATION)}")
        if weights is not None and coefficients is not None:
            raise ValueError("give weights or coefficients, not both")
        if rescale is not None and rescale not in _RESCALE:
            raise ValueError(f"rescale must be one of {sorted(_RESCALE)}")
        if precision not in _PRECISION:
            raise ValueError(f"precision must be one of {sorted(_PRECISION)}")
        coefficients = weights if weights is not None else coefficients
        spec = pb.MergeSpec(method=_METHODS[method], exclude=list(exclude),
                            gram_normalization=_GRAM_NORMALIZATION[gram_normalization],
                            result_name=name or "", base_id=_ref(base),
                            no_normalize=not normalize,
                            rescale=_RESCALE[rescale] if rescale else 0,
                            precision=_PRECISION[precision],
                            output=_output(shard_size, config_from, out_dtype))
        for i, model in enumerate(models):
            entry = spec.models.add(weights_id=_ref(model))
            if grams is not None:
                entry.gram_id = _ref(grams[i])
            if fishers is not None:
                entry.fisher_id = _ref(fishers[i])
            if coefficients is not None:
                entry.coefficient = float(coefficients[i])
            if densities is not None:
                entry.density = float(densities[i])
        if lambda_ is not None:
            setattr(spec, "lambda", float(lambda_))  # a Python keyword
        if density is not None:
            spec.density = float(density)
        if seed is not None:
            spec.seed = int(seed)
        if t is not None:
            spec.t = float(t)
        if alpha is not None:
            spec.alpha = float(alpha)
        if take_excluded_from is not None:
            spec.take_excluded_from = int(take_excluded_from)
        job = self._call(self._jobs.SubmitJob, pb.SubmitJobRequest(merge=spec))
        return Job(self, job)

    def grow(self, a: ArtifactRef, b: Optional[ArtifactRef] = None, *,
             layout: str, rules: Optional[str] = None, noise_scale: float = 0.0,
             name: Optional[str] = None, shard_size: Optional[int] = None,
             config_from: Optional[int] = None,
             out_dtype: Optional[str] = None) -> Job:
        """Submits a Deep Fusion growth of A and B (B omitted: self-fusion).
        ``layout`` is ``mlp``, ``bert``, ``gpt2`` or ``rules`` with ``rules``
        the text of a rule file (``REGEX ROLE [conv1d]`` per line). The
        result is ``Job.state_dict()``; ``Job.report`` has the new config,
        which the result's config.json carries (the side files come from A,
        or B with ``config_from=1``)."""
        spec = pb.GrowSpec(a_id=_ref(a), b_id=_ref(b), layout=layout,
                           rules=rules or "", noise_scale=float(noise_scale),
                           result_name=name or "",
                           output=_output(shard_size, config_from, out_dtype))
        return Job(self, self._call(self._jobs.SubmitJob, pb.SubmitJobRequest(grow=spec)))

    def sweep(self, a: ArtifactRef, b: ArtifactRef, steps: int, *,
              name: Optional[str] = None, shard_size: Optional[int] = None,
              config_from: Optional[int] = None,
              out_dtype: Optional[str] = None) -> Job:
        """Submits an interpolation sweep: the ``steps`` models
        ``(1 - t) A + t B`` for t evenly spaced from 0 to 1 (both included);
        ``Job.models()`` yields them lazily."""
        spec = pb.SweepSpec(a_id=_ref(a), b_id=_ref(b), steps=int(steps),
                            result_name=name or "",
                            output=_output(shard_size, config_from, out_dtype))
        return Job(self, self._call(self._jobs.SubmitJob, pb.SubmitJobRequest(sweep=spec)))

    def job(self, job_id: str) -> Job:
        return Job(self, self._call(self._jobs.GetJob, pb.GetJobRequest(id=job_id)))

    def jobs(self) -> List[Job]:
        return [Job(self, j) for j in
                self._call(self._jobs.ListJobs, pb.ListJobsRequest()).jobs]
