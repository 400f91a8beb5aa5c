"""FHIR export of glucose runs and of a twin's predicted days (``twinloop twin replay --fhir``).

The mapping lives with the glucose loop's agents, :mod:`twinloop.agents.glucose.fhir` (what every
therapy's export shares: :mod:`twinloop.agents.fhir`); this module keeps its names where the
twins' code and earlier callers import them.
"""

from __future__ import annotations

from twinloop.agents.fhir import DEFAULT_START as DEFAULT_START
from twinloop.agents.fhir import NAMESPACE as NAMESPACE
from twinloop.agents.fhir import PATIENT_SYSTEM as PATIENT_SYSTEM
from twinloop.agents.fhir import FhirExport as FhirExport
from twinloop.agents.fhir import FhirExportError as FhirExportError
from twinloop.agents.glucose.fhir import build_export as build_export
from twinloop.agents.glucose.fhir import export_run as export_run
from twinloop.agents.glucose.fhir import export_tables as export_tables
from twinloop.agents.glucose.fhir import write_bundle as write_bundle
