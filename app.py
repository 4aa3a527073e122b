"""sinkscope trace browser: `streamlit run app.py` (traces under $SINKSCOPE_ROOT, default traces/)."""

from sinkscope.webapp import main

main()
