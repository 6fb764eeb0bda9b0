"""DICOM studies in (series picked by rules), DICOM SEG and SR out, the PACS over DICOMweb."""
