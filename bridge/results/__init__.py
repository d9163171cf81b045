"""Lab and imaging results across the alliance.

* :mod:`bridge.results.routing`: store results taken in from a local system (LIS, PACS) and send
  them to the other side of every open referral of the patient, in one transaction
  (``AdapterHost.share_results``).
* :mod:`bridge.results.inbox`: results that arrive from another member (packet kinds
  ``result.lab`` / ``result.imaging``): stored in the local FHIR store, linked to the referral,
  then handed to the local handler (the HIS adapter or the spool) like any packet.
* :mod:`bridge.results.recognition`: the mutual-recognition view (检查检验结果互认): every
  result this node holds for a patient, with where and when it was produced.
"""
