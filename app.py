"""sinkscope trace browser (Streamlit). The full app lands with the app issue; run `streamlit run app.py`."""

import streamlit as st

st.set_page_config(page_title="sinkscope", layout="wide")
st.title("sinkscope")
st.info("The trace browser is not built yet. Record a trace with `sinkscope record` and inspect it with "
        "`sinkscope summary DIR`.")
