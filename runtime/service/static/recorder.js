// The AudioWorklet module of the page's Record button (page.js): runs on the audio thread and hands the
// microphone's samples (mono: the node mixes its input to one channel) to the page in blocks of about
// 0.1 s. A script file of its own, so the page's Content-Security-Policy (script-src 'self') admits it.
"use strict";
const BLOCK = 4096;  // samples per message (a render quantum is 128)

class EdgexferRecorder extends AudioWorkletProcessor {
  constructor() {
    super();
    this.block = new Float32Array(BLOCK);
    this.filled = 0;
    this.stopped = false;
    this.port.onmessage = () => {  // "stop": the rest, then no more
      this.port.postMessage(this.block.slice(0, this.filled));
      this.stopped = true;
    };
  }

  process(inputs) {
    if (this.stopped) return false;
    const channel = inputs[0] && inputs[0][0];
    if (!channel) return true;  // no input yet
    for (let i = 0; i < channel.length; i++) {
      this.block[this.filled++] = channel[i];
      if (this.filled === BLOCK) {
        this.port.postMessage(this.block);
        this.block = new Float32Array(BLOCK);
        this.filled = 0;
      }
    }
    return true;
  }
}

registerProcessor("edgexfer-recorder", EdgexferRecorder);
