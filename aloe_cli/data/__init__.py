"""Records and everything that moves them: the schema and its normalisation on read (records), readers and
writers for every format (io), images in every form incl. DICOM (images), pixel boxes <-> 0-1000 grounding
text (grounding), and the one record loop every data stage runs on (stage)."""
