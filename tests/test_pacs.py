"""DICOMweb against a real PACS (Orthanc, started by the ``orthanc_url`` fixture): find, pull, push, the round
trip of the issue (pull a TCIA series, segment it, push the SEG, find it), errors, credentials and TLS."""

from __future__ import annotations

import datetime
import json
import ssl
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from helpers_orthanc import orthanc

import napari_medssl
from napari_medssl import pacs, zoo
from napari_medssl.engine.cli import main
from napari_medssl.io import read_dicom, read_nifti
from napari_medssl.io.dicom_seg import read_seg, seg_provenance

T1POST = "dicom/tcia_btp_PGBM-001/11-19-1991-FH-HEADBrain Protocols-40993/11-T1post-03326"
T2REG = "dicom/tcia_btp_PGBM-001/11-19-1991-FH-HEADBrain Protocols-40993/37910-T2reg-84816"
N_SLICES = 6
"""Slices of the T1post series put on the PACS for the round trip (the tumour's middle; keeps it fast)."""
MODEL = "unet_tiny_hippocampus"


@pytest.fixture(autouse=True)
def _no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (pacs.ENV_TOKEN, pacs.ENV_USER, pacs.ENV_PASSWORD, pacs.ENV_CA_BUNDLE, pacs.ENV_INSECURE):
        monkeypatch.delenv(name, raising=False)


def _middle_slices(folder: Path, n: int) -> list[Path]:
    (vol,) = read_dicom(folder)
    files = [Path(f) for f in vol.metadata["files"]]
    start = (len(files) - n) // 2
    return files[start : start + n]


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def test_round_trip_pull_segment_push_find(
    orthanc_url: str, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    files = _middle_slices(data_dir / T1POST, N_SLICES)
    series = _uid(files[0])
    assert main(["pacs", "push", orthanc_url, *map(str, files)]) == 0
    capsys.readouterr()
    started = time.perf_counter()
    assert main(["pacs", "find", orthanc_url, "--patient", "PGBM-001", "--modality", "MR"]) == 0
    table = capsys.readouterr().out
    assert any(line.split("\t")[0] == series and "T1post" in line for line in table.splitlines())
    cache = tmp_path / "cache"
    assert main(["pacs", "pull", orthanc_url, "--series", series, "--out", str(cache / series)]) == 0
    pulled = sorted((cache / series).glob("*.dcm"))
    assert len(pulled) == N_SLICES
    seg_path, nii_path = tmp_path / "pred.dcm", tmp_path / "pred.nii.gz"
    for out in (seg_path, nii_path):
        args = [
            "predict",
            "--model",
            MODEL,
            "--input",
            str(cache / series),
            "--output",
            str(out),
            "--threads",
            "1",
        ]
        assert main(args) == 0
    assert main(["pacs", "push", orthanc_url, str(seg_path)]) == 0
    seg_uid = _uid(seg_path)
    found = pacs.find(pacs.connect(orthanc_url), modality="SEG")  # the session's PACS may hold other SEGs
    assert [r["series_uid"] for r in found].count(seg_uid) == 1
    pacs.pull(
        pacs.connect(orthanc_url), seg_uid, cache / seg_uid
    )  # beside the source series, as the dock does
    elapsed = time.perf_counter() - started
    print(
        f"\nround trip (find, pull {N_SLICES} slices, 2 predictions, push SEG, find, pull SEG): {elapsed:.1f} s"
    )

    (seg_file,) = (cache / seg_uid).glob("*.dcm")
    ds = pydicom.dcmread(seg_file)
    seg = hd.seg.Segmentation.from_dataset(ds)  # parses with highdicom
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series
    sources = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in pulled}
    assert {uid for _, _, uid in seg.get_source_image_uids()} == set(sources)
    for item in ds.PerFrameFunctionalGroupsSequence:  # each frame on its source slice
        ref = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        assert position == [float(v) for v in sources[ref].ImagePositionPatient]
    nifti = read_nifti(nii_path)
    labels = read_seg(seg_file)  # finds the source series in the sibling folder
    assert nifti.data.any()
    np.testing.assert_array_equal(labels.data, nifti.data)
    np.testing.assert_allclose(labels.affine, nifti.affine, atol=1e-4)
    # provenance: the same facts in the NIfTI's sidecar and in the SEG
    sidecar = json.loads(Path(f"{nii_path}.json").read_text())
    expected = {
        "model": MODEL,
        "weights_sha256": zoo.card(MODEL)["weights"]["sha256"],
        "package_version": napari_medssl.__version__,
        "source_series_uid": series,
    }
    assert {k: sidecar[k] for k in expected} == expected
    assert {k: seg_provenance(ds)[k] for k in expected} == expected
    assert MODEL in ds.SeriesDescription and MODEL in str(ds.ContentCreatorName)
    assert ds.SegmentSequence[-1].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Hippocampus"


def test_find_filters_and_pull_gives_the_same_instances(
    orthanc_url: str, data_dir: Path, tmp_path: Path
) -> None:
    files = _middle_slices(data_dir / T2REG, 3)
    client = pacs.connect(orthanc_url)
    assert pacs.push(client, files) == 3
    rows = pacs.find(client, patient="PGBM-001")
    t2 = [r for r in rows if r["series_uid"] == _uid(files[0])]
    assert len(t2) == 1 and t2[0]["modality"] == "MR" and t2[0]["instances"] == 3
    assert pacs.find(client, patient="NOBODY") == []
    pulled = pacs.pull(client, t2[0]["series_uid"], tmp_path / "t2")
    assert sorted(pydicom.dcmread(f).SOPInstanceUID for f in pulled) == sorted(
        pydicom.dcmread(f).SOPInstanceUID for f in files
    )
    np.testing.assert_array_equal(read_dicom(tmp_path / "t2")[0].data, read_dicom(files)[0].data)


def test_errors_are_clear_and_lose_nothing(
    orthanc_url: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    client = pacs.connect(orthanc_url)
    with pytest.raises(pacs.PacsError, match="holds no series 1.2.3.4"):
        pacs.pull(client, "1.2.3.4", tmp_path / "none")
    text = tmp_path / "notes.txt"
    text.write_text("not DICOM")
    with pytest.raises(pacs.PacsError, match="notes.txt is not a DICOM file"):
        pacs.push(client, [text])
    assert text.read_text() == "not DICOM"
    with pytest.raises(pacs.PacsError, match="not a DICOMweb URL"):
        pacs.connect("ftp://example.org")
    dead = "http://127.0.0.1:9/dicom-web"  # the discard port: nothing listens
    assert main(["pacs", "find", dead]) == 1
    assert "cannot reach the PACS at http://127.0.0.1:9/dicom-web" in capsys.readouterr().err


def test_basic_auth_from_the_environment(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with orthanc(tmp_path / "orthanc", users={"reader": "s3cret-pw"}) as url:
        with pytest.raises(pacs.PacsError, match=r"HTTP 401: credentials missing or wrong.*MEDSSL_PACS_USER"):
            pacs.find(pacs.connect(url))
        monkeypatch.setenv(pacs.ENV_USER, "reader")
        with pytest.raises(pacs.PacsError, match="no password was found"):
            pacs.connect(url)
        monkeypatch.setenv(pacs.ENV_PASSWORD, "s3cret-pw")
        client = pacs.connect(url)
        assert pacs.push(client, _middle_slices(data_dir / T1POST, 1)) == 1
        assert len(pacs.find(client, modality="MR")) == 1


def test_credentials_order_environment_then_keyring(monkeypatch: pytest.MonkeyPatch) -> None:
    import keyring
    from keyring.backend import KeyringBackend

    class Memory(KeyringBackend):
        priority = 1
        entries: dict[tuple[str, str], str] = {}

        def get_password(self, service: str, username: str) -> str | None:
            return self.entries.get((service, username))

        def set_password(self, service: str, username: str, password: str) -> None:
            self.entries[(service, username)] = password

        def delete_password(self, service: str, username: str) -> None:
            self.entries.pop((service, username), None)

    url = "https://pacs.example.org/dicom-web"
    previous = keyring.get_keyring()
    keyring.set_keyring(Memory())
    try:
        assert pacs.credentials(url) == ("none", None)
        keyring.set_password(pacs.KEYRING_SERVICE, url, "kr-token")
        assert pacs.credentials(url + "/") == ("bearer", "kr-token")
        assert pacs.connect(url).__dict__["_session"].headers["Authorization"] == "Bearer kr-token"
        monkeypatch.setenv(pacs.ENV_USER, "alice")  # with a user, the keyring entry is her password
        assert pacs.credentials(url) == ("basic", ("alice", "kr-token"))
        monkeypatch.setenv(pacs.ENV_PASSWORD, "env-pw")
        assert pacs.credentials(url) == ("basic", ("alice", "env-pw"))
        monkeypatch.setenv(pacs.ENV_TOKEN, "env-token")
        assert pacs.credentials(url) == ("bearer", "env-token")
    finally:
        keyring.set_keyring(previous)


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (PEM), made with cryptography."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


class _EmptyQido(BaseHTTPRequestHandler):
    """A TLS endpoint answering every QIDO search with no results (Orthanc's own HTTPS crashes on Debian 12)."""

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        body = b"[]"
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_tls_is_verified_by_default_and_a_ca_bundle_or_explicit_insecure_gets_through(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EmptyQido)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"https://127.0.0.1:{server.server_address[1]}/dicom-web"
    try:
        with pytest.raises(pacs.PacsError, match="TLS verification failed.*--ca-bundle"):
            pacs.find(pacs.connect(url))
        assert pacs.find(pacs.connect(url, ca_bundle=cert)) == []
        with pytest.warns(pacs.InsecurePacsWarning, match="verification is OFF"):
            client = pacs.connect(url, insecure=True)
        assert pacs.find(client) == []
        with pytest.raises(pacs.PacsError, match="does not exist"):
            pacs.connect(url, ca_bundle=tmp_path / "missing.pem")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # verification on: no warning
            pacs.connect(url, ca_bundle=cert)
    finally:
        server.shutdown()
        server.server_close()
