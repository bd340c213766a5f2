"""DICOMweb (QIDO-RS, WADO-RS, STOW-RS) for a PACS: find series, pull one into a folder, push files.

Pure (dicomweb-client, requests, keyring; no napari, Qt or torch): used by ``medssl pacs`` and the PACS dock.

Credentials, first found wins, never from a project file:

1. ``$MEDSSL_PACS_TOKEN``: an OAuth/bearer token (``Authorization: Bearer ...``);
2. ``$MEDSSL_PACS_USER`` and ``$MEDSSL_PACS_PASSWORD``: HTTP basic auth;
3. the system keyring, service :data:`KEYRING_SERVICE` (``napari-medssl-pacs``), entry named by the server
   URL: the password of ``$MEDSSL_PACS_USER`` when that is set, else a bearer token. Store one with
   ``keyring set napari-medssl-pacs https://pacs.example.org/dicom-web``;
4. none (an open server, e.g. a local Orthanc).

TLS: certificates are verified by default (system CAs via certifi). ``ca_bundle`` / ``$MEDSSL_PACS_CA_BUNDLE``
names a PEM bundle for a hospital CA; ``insecure=True`` / ``$MEDSSL_PACS_INSECURE=1`` turns verification off
and warns (:class:`InsecurePacsWarning`) every time a client is made.

Every failure (unreachable server, TLS, HTTP 4xx/5xx, a refused instance) raises :class:`PacsError` with the
URL and what to do; a pull writes each instance atomically, so a broken pull leaves only whole files.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import requests

KEYRING_SERVICE = "napari-medssl-pacs"
ENV_TOKEN = "MEDSSL_PACS_TOKEN"
ENV_USER = "MEDSSL_PACS_USER"
ENV_PASSWORD = "MEDSSL_PACS_PASSWORD"
ENV_CA_BUNDLE = "MEDSSL_PACS_CA_BUNDLE"
ENV_INSECURE = "MEDSSL_PACS_INSECURE"
TIMEOUT = (10.0, 120.0)
"""Seconds to connect and to wait for each read from the server."""
RETRY_ATTEMPTS = 3
"""Tries per request (busy servers answer 429/503); waits 0.4 s then 0.8 s between them."""
STOW_BATCH = 16
"""Instances sent per STOW request."""
SERIES_FIELDS = (
    "PatientID",
    "PatientName",
    "StudyDate",
    "StudyDescription",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SeriesDescription",
    "SeriesNumber",
    "Modality",
    "NumberOfSeriesRelatedInstances",
)


class PacsError(OSError):
    """A PACS request that failed; the message names the server and what to do."""


class InsecurePacsWarning(UserWarning):
    """TLS certificate verification is turned off for a PACS connection."""


def _truthy(value: str | None) -> bool:
    return str(value or "").strip().lower() in ("1", "true", "yes", "on")


def credentials(url: str) -> tuple[str, Any]:
    """``(kind, value)`` for ``url``: ``("bearer", token)``, ``("basic", (user, password))`` or ``("none", None)``.

    See the module docstring for the order (environment, then keyring). A missing or broken keyring
    backend counts as no entry.
    """
    token = os.environ.get(ENV_TOKEN)
    if token:
        return "bearer", token
    user, password = os.environ.get(ENV_USER), os.environ.get(ENV_PASSWORD)
    if user and password:
        return "basic", (user, password)
    secret = _keyring_secret(url.rstrip("/"))
    if secret:
        return ("basic", (user, secret)) if user else ("bearer", secret)
    if user:
        raise PacsError(
            f"{ENV_USER} is set but no password was found: set {ENV_PASSWORD}, or store it with "
            f"`keyring set {KEYRING_SERVICE} {url.rstrip('/')}`"
        )
    return "none", None


def _keyring_secret(name: str) -> str | None:
    try:
        import keyring
        from keyring.errors import KeyringError

        try:
            return keyring.get_password(KEYRING_SERVICE, name)
        except (KeyringError, RuntimeError):  # no backend (headless Linux) or a locked one
            return None
    except ImportError:
        return None


def _verify(ca_bundle: str | os.PathLike | None, insecure: bool | None) -> bool | str:
    """requests' ``verify``: a CA bundle path, ``True`` (default), or ``False`` with a warning."""
    insecure = _truthy(os.environ.get(ENV_INSECURE)) if insecure is None else insecure
    ca_bundle = ca_bundle or os.environ.get(ENV_CA_BUNDLE)
    if insecure:
        warnings.warn(
            InsecurePacsWarning(
                "TLS certificate verification is OFF for the PACS connection: anyone on the network path can "
                "read or alter the images; give the server's CA with --ca-bundle instead"
            ),
            stacklevel=3,
        )
        return False
    if ca_bundle:
        if not Path(ca_bundle).is_file():
            raise PacsError(f"CA bundle {ca_bundle} does not exist (--ca-bundle / ${ENV_CA_BUNDLE})")
        return str(ca_bundle)
    return True


class _Session(requests.Session):
    """A session whose own ``verify`` (a CA bundle, or off) wins over ``$REQUESTS_CA_BUNDLE`` (requests #3829)."""

    def merge_environment_settings(self, url, proxies, stream, verify, cert):  # noqa: ANN001, ANN201
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if verify is None and self.verify is not True:
            settings["verify"] = self.verify
        return settings


def connect(url: str, *, ca_bundle: str | os.PathLike | None = None, insecure: bool | None = None) -> Any:
    """A ``dicomweb_client.DICOMwebClient`` for the DICOMweb root ``url`` with credentials and TLS set.

    Raises:
        PacsError: A URL that is not http(s), a missing CA bundle, or a user without a password.
    """
    from dicomweb_client import DICOMwebClient

    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise PacsError(f"{url!r} is not a DICOMweb URL (expected http(s)://host[:port]/path-to-dicom-web)")
    session = _Session()
    session.verify = _verify(ca_bundle, insecure)
    kind, value = credentials(url)
    if kind == "bearer":
        session.headers["Authorization"] = f"Bearer {value}"
    elif kind == "basic":
        session.auth = value
    if (
        kind != "none"
        and parsed.scheme == "http"
        and parsed.hostname not in ("127.0.0.1", "localhost", "::1")
    ):
        warnings.warn(
            InsecurePacsWarning(f"credentials sent without TLS (plain http) to {parsed.netloc}; use https"),
            stacklevel=2,
        )
    client = DICOMwebClient(url.rstrip("/"), session=session, timeout=TIMEOUT)
    # dicomweb-client retries every failure, a refused connection too: a few quick tries, not half a minute
    client.set_http_retry_params(retry=True, max_attempts=RETRY_ATTEMPTS, wait_exponential_multiplier=200)
    return client


@contextmanager
def _errors(url: str, what: str) -> Iterator[None]:
    """Turn requests/HTTP failures into one :class:`PacsError` naming the server and a remedy."""
    try:
        yield
    except PacsError:
        raise
    except requests.exceptions.SSLError as err:
        raise PacsError(
            f"{what}: TLS verification failed for {url} ({err.__class__.__name__}); give the server's CA "
            f"bundle with --ca-bundle or ${ENV_CA_BUNDLE}"
        ) from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as err:
        raise PacsError(
            f"{what}: cannot reach the PACS at {url} ({err.__class__.__name__}); is it running?"
        ) from None
    except requests.exceptions.HTTPError as err:
        status = err.response.status_code if err.response is not None else "?"
        hint = {
            401: f"credentials missing or wrong: set ${ENV_TOKEN}, or ${ENV_USER} + ${ENV_PASSWORD}, or a keyring "
            f"entry ({KEYRING_SERVICE})",
            403: "the account may not do this",
            404: "no such object, or the URL is not the DICOMweb root",
        }.get(status, "the server refused the request")
        raise PacsError(f"{what}: the PACS at {url} answered HTTP {status}: {hint}") from None


def _value(item: dict[str, Any], keyword: str) -> Any:
    """One attribute of a DICOM JSON result (``None`` when absent)."""
    from pydicom.datadict import tag_for_keyword

    entry = item.get(f"{tag_for_keyword(keyword):08X}") or {}
    values = entry.get("Value") or [None]
    value = values[0]
    if isinstance(value, dict):  # PersonName
        return value.get("Alphabetic")
    return value


def find(
    client: Any, *, patient: str | None = None, modality: str | None = None, limit: int | None = None
) -> list[dict[str, Any]]:
    """Series on the PACS matching a patient ID and/or a modality (QIDO-RS), newest study first.

    Returns:
        One dict per series: ``patient_id``, ``patient_name``, ``study_date``, ``study_uid``, ``series_uid``,
        ``series_number``, ``modality``, ``description``, ``instances``.
    """
    filters = {k: v for k, v in (("PatientID", patient), ("Modality", modality)) if v}
    with _errors(client.base_url, "search"):
        found = client.search_for_series(
            fields=list(SERIES_FIELDS), search_filters=filters, limit=limit, get_remaining=limit is None
        )
    rows = []
    for item in found:
        rows.append(
            {
                "patient_id": _value(item, "PatientID"),
                "patient_name": _value(item, "PatientName"),
                "study_date": _value(item, "StudyDate"),
                "study_uid": _value(item, "StudyInstanceUID"),
                "series_uid": _value(item, "SeriesInstanceUID"),
                "series_number": _value(item, "SeriesNumber"),
                "modality": _value(item, "Modality"),
                "description": _value(item, "SeriesDescription") or "",
                "instances": _value(item, "NumberOfSeriesRelatedInstances"),
            }
        )
    rows.sort(key=lambda r: (str(r["study_date"] or ""), r["series_number"] or 0), reverse=True)
    return rows


def _study_of(client: Any, series_uid: str) -> str:
    with _errors(client.base_url, "search"):
        found = client.search_for_series(
            fields=["StudyInstanceUID"], search_filters={"SeriesInstanceUID": series_uid}
        )
    if not found:
        raise PacsError(f"pull: the PACS at {client.base_url} holds no series {series_uid}")
    return str(_value(found[0], "StudyInstanceUID"))


def pull(
    client: Any,
    series_uid: str,
    out_dir: str | os.PathLike,
    *,
    study_uid: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[Path]:
    """Retrieve every instance of a series (WADO-RS) into ``out_dir/<SOPInstanceUID>.dcm``.

    Each file is written atomically as it arrives; ``progress(n)`` is called after each.

    Returns:
        The written files.

    Raises:
        PacsError: Unknown series, unreachable server, HTTP error.
    """
    from napari_medssl._atomic import atomic_write

    study_uid = study_uid or _study_of(client, series_uid)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with _errors(client.base_url, f"pull series {series_uid}"):
        for ds in client.iter_series(study_uid, series_uid):
            name = "".join(c for c in str(ds.SOPInstanceUID) if c.isdigit() or c == ".") or f"{len(written)}"
            if not getattr(ds, "preamble", None):
                ds.preamble = b"\0" * 128
            written.append(
                atomic_write(out / f"{name}.dcm", lambda tmp, d=ds: d.save_as(tmp, enforce_file_format=True))
            )
            if progress is not None:
                progress(len(written))
    if not written:
        raise PacsError(f"pull: the PACS at {client.base_url} returned no instance of series {series_uid}")
    return written


def push(
    client: Any, items: Sequence[str | os.PathLike | Any], progress: Callable[[int], None] | None = None
) -> int:
    """Store DICOM files or datasets on the PACS (STOW-RS), :data:`STOW_BATCH` per request.

    Returns:
        The number of instances the PACS accepted.

    Raises:
        PacsError: A file that is not DICOM, an unreachable server, an HTTP error, or instances the PACS
            refused (FailedSOPSequence).
    """
    import pydicom

    datasets = []
    for item in items:
        if isinstance(item, pydicom.Dataset):
            datasets.append(item)
            continue
        try:
            datasets.append(pydicom.dcmread(item))
        except FileNotFoundError:
            raise PacsError(f"push: {item} does not exist") from None
        except Exception as err:
            raise PacsError(f"push: {item} is not a DICOM file ({type(err).__name__}: {err})") from None
    if not datasets:
        raise PacsError("push: no DICOM files given")
    stored = 0
    for start in range(0, len(datasets), STOW_BATCH):
        batch = datasets[start : start + STOW_BATCH]
        with _errors(client.base_url, "push"):
            response = client.store_instances(batch)
        failed = response.get("FailedSOPSequence") if response is not None else None
        if failed:
            reasons = sorted({str(f.get("FailureReason", "?")) for f in failed})
            raise PacsError(
                f"push: the PACS at {client.base_url} refused {len(failed)} of {len(batch)} instance(s) "
                f"(failure reason {', '.join(reasons)}); {stored} stored before"
            )
        stored += len(batch)
        if progress is not None:
            progress(stored)
    return stored


def cache_dir() -> Path:
    """Where the PACS dock keeps pulled series: ``$MEDSSL_CACHE_DIR/pacs`` (default pooch's cache folder)."""
    from napari_medssl import cache

    return cache.cache_dir() / "pacs"


def pull_for_viewing(client: Any, row: dict[str, Any], cache: str | os.PathLike | None = None) -> Path:
    """Pull a :func:`find` row's series into ``cache/<study UID>/<series UID>`` for a viewer; return that folder.

    A SEG series also gets its referenced source series pulled beside it (unless already there), so the SEG
    opens on that series' grid.
    """
    import pydicom

    study = Path(cache or cache_dir()) / str(row["study_uid"])
    folder = study / str(row["series_uid"])
    files = pull(client, row["series_uid"], folder, study_uid=row["study_uid"])
    if str(row.get("modality")) == "SEG":
        from napari_medssl.io.dicom_seg import referenced_series_uid

        source = referenced_series_uid(pydicom.dcmread(files[0], stop_before_pixels=True))
        if source and not any((study / source).glob("*.dcm")):
            pull(client, source, study / source, study_uid=row["study_uid"])
    return folder
