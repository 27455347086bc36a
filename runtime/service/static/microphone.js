// The microphone of the page's Record button (page.js calls canRecord, recordMicrophone and wavFile):
// capture with the Web Audio API, an AudioWorklet from /static/recorder.js (the older ScriptProcessorNode where
// a browser has none), and a 16-bit mono WAV made here. Plain script files of the page's own origin, so its
// Content-Security-Policy (script-src 'self') holds; loaded before page.js.
"use strict";

// a microphone: getUserMedia, only in a secure context (https, or http://localhost)
const canRecord = () => window.isSecureContext && !!(navigator.mediaDevices && navigator.mediaDevices.getUserMedia);
const MONO = { channelCount: 1, channelCountMode: "explicit", channelInterpretation: "speakers" };

// `seconds` of the microphone: {samples: Float32Array (mono), rate: the audio context's rate}. The device
// resamples (soxr) what it reads to the bundle's rate, better than the page could, so the rate is kept.
async function recordMicrophone(seconds) {
  let stream;
  try {  // the browser asks the user once; echo cancellation and the like change the sound: off
    stream = await navigator.mediaDevices.getUserMedia(
      { audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false } });
  } catch (exc) {
    throw new Error(`no microphone to record from (${exc.name}: ${exc.message}): allow the page to use one, ` +
                    "or upload a WAV file");
  }
  const ctx = new AudioContext();
  try {
    await ctx.resume();
    const wanted = Math.round(seconds * ctx.sampleRate);
    const blocks = [];
    let got = 0, full;
    const done = new Promise((ok) => { full = ok; });
    const take = (block) => {
      if (got >= wanted) return;
      blocks.push(block);
      got += block.length;
      if (got >= wanted) full();
    };
    let node;
    try {  // the samples on the audio thread, from a script file (script-src 'self')
      await ctx.audioWorklet.addModule("/static/recorder.js");
      node = new AudioWorkletNode(ctx, "edgexfer-recorder", { numberOfInputs: 1, numberOfOutputs: 1, ...MONO });
      node.port.onmessage = (e) => take(e.data);
    } catch (_) {  // no AudioWorklet here: the older ScriptProcessorNode (mixes to mono itself)
      node = ctx.createScriptProcessor(4096, 1, 1);
      node.onaudioprocess = (e) => take(e.inputBuffer.getChannelData(0).slice());
    }
    ctx.createMediaStreamSource(stream).connect(node);
    node.connect(ctx.destination);  // its output is silence; connected, the graph runs
    let timer;
    const silent = new Promise((_, fail) => { timer = setTimeout(() => fail(new Error(
      `the microphone gave ${(got / ctx.sampleRate).toFixed(1)} of ${seconds} s; check that it is on and allowed`)),
    1000 * seconds + 5000); });
    try { await Promise.race([done, silent]); } finally { clearTimeout(timer); }
    const samples = new Float32Array(wanted);
    let at = 0;
    for (const b of blocks) { samples.set(b.subarray(0, wanted - at), at); at += Math.min(b.length, wanted - at); }
    return { samples, rate: Math.round(ctx.sampleRate) };
  } finally {
    for (const track of stream.getTracks()) track.stop();
    await ctx.close();
  }
}

// a 16-bit mono PCM WAV file of `samples` (floats in [-1, 1]) at `rate`
function wavFile(samples, rate) {
  const view = new DataView(new ArrayBuffer(44 + 2 * samples.length));
  const ascii = (at, s) => { for (let i = 0; i < s.length; i++) view.setUint8(at + i, s.charCodeAt(i)); };
  ascii(0, "RIFF"); view.setUint32(4, 36 + 2 * samples.length, true); ascii(8, "WAVE");
  ascii(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true);  // PCM
  view.setUint16(22, 1, true); view.setUint32(24, rate, true); view.setUint32(28, 2 * rate, true);  // mono, bytes/s
  view.setUint16(32, 2, true); view.setUint16(34, 16, true);  // block align, bits
  ascii(36, "data"); view.setUint32(40, 2 * samples.length, true);
  for (let i = 0; i < samples.length; i++) {
    const v = Math.max(-1, Math.min(1, samples[i]));
    view.setInt16(44 + 2 * i, Math.round(v < 0 ? v * 32768 : v * 32767), true);
  }
  return new Blob([view], { type: "audio/wav" });
}
