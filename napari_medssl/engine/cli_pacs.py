"""``medssl pacs find|pull|push``: the DICOMweb commands (thin over :mod:`napari_medssl.pacs`).

Registered on the ``medssl`` parser by :func:`register`; :func:`cmd_pacs` runs them. Errors are
:class:`~napari_medssl.pacs.PacsError` (an ``OSError``), printed as one line by ``medssl``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any

HELP = """\
Talk to a PACS over DICOMweb (QIDO-RS search, WADO-RS retrieve, STOW-RS store). URL is the DICOMweb root,
e.g. https://pacs.example.org/dicom-web (Orthanc: http://HOST:8042/dicom-web).

credentials (first found wins; never from a file in the project):
  MEDSSL_PACS_TOKEN                          bearer token
  MEDSSL_PACS_USER + MEDSSL_PACS_PASSWORD    HTTP basic auth
  system keyring, service napari-medssl-pacs, entry = URL: the password of MEDSSL_PACS_USER, or a token
      (store one with: keyring set napari-medssl-pacs https://pacs.example.org/dicom-web)
TLS: verified by default; --ca-bundle PEM (or MEDSSL_PACS_CA_BUNDLE) for a hospital CA; --insecure (or
  MEDSSL_PACS_INSECURE=1) turns verification off, with a warning.

examples:
  medssl pacs find http://127.0.0.1:8042/dicom-web --patient PGBM-001 --modality MR
  medssl pacs pull http://127.0.0.1:8042/dicom-web --series 1.3.6.1.4... --out cache/t1post
  medssl predict --model unet_tiny_hippocampus --input cache/t1post --output seg.dcm
  medssl pacs push http://127.0.0.1:8042/dicom-web seg.dcm
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", metavar="URL", help="the DICOMweb root, e.g. https://pacs.example.org/dicom-web")
    p.add_argument("--ca-bundle", metavar="PEM", help="CA certificates to verify the server with")
    p.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="do not verify TLS certificates (warned; testing only)",
    )


def register(sub: Any) -> None:
    """Add the ``pacs`` command and its ``find``, ``pull`` and ``push`` sub-commands to ``sub``."""
    p = sub.add_parser(
        "pacs",
        help="find, pull and push DICOM over DICOMweb",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="pacs_command", metavar="ACTION", parser_class=type(p))
    actions.required = True
    q = actions.add_parser(
        "find", help="list series (QIDO-RS)", description="List the series matching the filters."
    )
    _common(q)
    q.add_argument("--patient", metavar="ID", help="PatientID (wildcards * and ? allowed)")
    q.add_argument("--modality", metavar="MOD", help="Modality: MR, CT, SEG ...")
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    q = actions.add_parser(
        "pull", help="download a series (WADO-RS)", description="Save a series' instances."
    )
    _common(q)
    q.add_argument("--series", required=True, metavar="UID", help="SeriesInstanceUID")
    q.add_argument("--out", required=True, metavar="DIR", help="folder for the files (<SOPInstanceUID>.dcm)")
    q = actions.add_parser(
        "push", help="upload DICOM files (STOW-RS)", description="Store DICOM files on the PACS."
    )
    _common(q)
    q.add_argument(
        "files", nargs="+", metavar="FILE", help="DICOM files (a SEG written by medssl predict ...)"
    )


def cmd_pacs(args: argparse.Namespace) -> int:
    """Run ``medssl pacs ACTION``."""
    from napari_medssl import pacs

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pacs.InsecurePacsWarning)
        client = pacs.connect(args.url, ca_bundle=args.ca_bundle, insecure=args.insecure)
    for w in caught:
        sys.stderr.write(f"medssl pacs: warning: {w.message}\n")
    if args.pacs_command == "find":
        rows = pacs.find(client, patient=args.patient, modality=args.modality)
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            for r in rows:
                print(
                    f"{r['series_uid']}\t{r['modality']}\t{r['patient_id']}\t{r['study_date']}\t"
                    f"{r['instances']}\t{r['description']}"
                )
            sys.stderr.write(f"{len(rows)} series\n")
    elif args.pacs_command == "pull":
        files = pacs.pull(client, args.series, args.out)
        print(f"{len(files)} instance(s) of series {args.series} -> {args.out}")
    else:
        n = pacs.push(client, args.files)
        print(f"{n} instance(s) stored on {args.url}")
    return 0
